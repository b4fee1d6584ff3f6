"""DELLA-Merging (Deep, Bhardwaj & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024; arXiv 2406.11617): MAGPRUNE drops each task-vector entry with a probability
that falls as its magnitude rank rises, rescales the survivors, then merges by TIES' sign election and disjoint
mean (`della`) or by task arithmetic (`della_linear`), as mergekit 0.1.5's methods of those names.

MAGPRUNE as mergekit computes it, per row of each δ_i = θ_i − θ_0 (a 1-D tensor is one row; a tensor of 3 or
more dimensions is ranked along its dim 1, as mergekit's `argsort(dim=1)` does):
    r   = rank of |δ| in its row, 1 (smallest) … n (largest), from an ascending argsort;
    ρ   = (r − min r) / (max r − min r) ∈ [0, 1];
    p   = (density − ε) + 2ε·ρ          — the keep probability, linear in rank from density − ε to density + ε,
                                          mean `density` (the paper's p_min … p_max around 1 − density);
    m   ~ Bernoulli(p);  δ̂ = m ⊙ δ, then rescaled.
Then W_i = w_i δ̂_i; `della` elects s = sign⁺(Σ W_i) and sums the agreeing W_i, divided by the agreeing weights
when `normalize`; `della_linear` sums all W_i (÷ Σ w_i when `normalize`); the result × λ is added to the base.

Defaults. A mergekit YAML (`semantics: mergekit`, the default) gets exactly mergekit's: density 1.0 (nothing
dropped), epsilon 0.15, lambda 1.0, rescale "l1" (mergekit's `rescale: true`: the kept entries scaled so that
‖δ̂‖₁ = ‖δ‖₁, skipped when either norm is below 1e-7), normalize true for `della`, false for `della_linear`.
The Python API differs in two values: rescale "inverse_probability" — each kept entry ÷ its own keep
probability p, the paper's 1/(1 − p_i) for drop probability p_i (recalled from the paper, not re-read), which
keeps δ̂ unbiased entry by entry — and density 0.5 (ours, unverified: the paper's recommended density/ε are
NOT FOUND in our notes). "none" drops only. A density below 1 needs 0 < density ± ε < 1 (mergekit's rule);
density 0 zeroes the task vector.

Arithmetic follows mergekit: the rank, probabilities, draw and rescale run in float32 for float32 / float16
inputs and in bfloat16 for bfloat16 ones; float64 inputs stay float64 (mergekit would use float32). A one-entry
row (ranks 0/0 in mergekit's formula) gets p = density, and a 0-d tensor is one such row (mergekit fails on it).

Randomness: mergekit draws every mask from torch's one global generator, seeded once by `--random-seed`, in the
order its graph merges tensors (models in config order within a tensor); a mask therefore depends on every tensor
merged before it. deltatune draws model i's mask on tensor `name` from its own generator seeded by
hash(seed, name, i) (`registry.tensor_generators`), so masks do not depend on shard layout or order — and are
not mergekit's masks: a DELLA merge here equals mergekit's in distribution, not entry by entry. The draw itself
is the same `torch.bernoulli(p, generator)` call on the same p, so fed mergekit's generator stream in mergekit's
tensor order it gives mergekit's output bit for bit (tests/merging/test_mergekit_parity.py replays it, float32
and bfloat16). So deltatune's `seed:` (YAML) / `--seed` maps to masks through that hash, not as mergekit's
`--random-seed`: the same number gives other masks than mergekit's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra.family import TaskModelParams, merge_task_vectors
from deltatune.merging.params import check_field_types, require_nonzero_sum
from deltatune.merging.registry import MergeInputs, register_merge

DELLA_RESCALES = ("l1", "inverse_probability", "none")
RESCALE_EPS = 1e-7  # mergekit's: no L1 rescale when either norm is below this


@dataclass(frozen=True)
class DellaModelParams(TaskModelParams):
    """weight w_i; density: mean keep probability; epsilon ε: half the spread of keep probabilities over ranks."""

    density: float = 0.5
    epsilon: float = 0.15

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(0.0 <= self.epsilon < 0.5, "epsilon", self.epsilon, "a number in [0, 0.5)",
                     "the keep probabilities run from density - epsilon to density + epsilon")
        if 0.0 < self.density < 1.0:
            config_check(0.0 < self.density - self.epsilon and self.density + self.epsilon < 1.0, "epsilon",
                         self.epsilon, f"0 < density ± epsilon < 1 (density is {self.density:g}, so epsilon < "
                         f"{min(self.density, 1 - self.density):g})", "lower epsilon or move density toward 0.5")


@dataclass(frozen=True)
class DellaParams:
    """scaling: λ (YAML `lambda`). normalize: divide by the (agreeing) weights. rescale: "inverse_probability"
    (the paper's ÷ p per kept entry), "l1" (mergekit's `rescale: true`) or "none". int8_mask: no effect."""

    scaling: float = 1.0
    normalize: bool = True
    rescale: str = "inverse_probability"
    int8_mask: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rescale, bool):  # mergekit's boolean `rescale`
            object.__setattr__(self, "rescale", "l1" if self.rescale else "none")
        check_field_types(self)
        config_check(self.rescale in DELLA_RESCALES, "rescale", self.rescale, f"one of {DELLA_RESCALES}")


@dataclass(frozen=True)
class DellaLinearParams(DellaParams):
    """DellaParams without sign election; normalize (÷ Σ w_i) defaults to false, as mergekit's della_linear."""

    normalize: bool = False


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float64) else torch.float32


def keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE's per-entry keep probability p (module docstring), shaped as rows: (1, n) for a 1-D δ."""
    work = _work_dtype(delta.dtype)
    rows = delta.reshape(1, 1) if delta.dim() == 0 else delta.unsqueeze(0) if delta.dim() == 1 else delta
    if rows.shape[1] < 2:  # one entry per row: its rank is both the min and the max
        return torch.full(rows.shape, density, dtype=work, device=delta.device)
    magnitudes = rows.abs()
    ranks = torch.argsort(magnitudes, dim=1, descending=False).argsort(dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon  # same operation order as mergekit (bit parity)


def magprune(delta: Tensor, density: float, epsilon: float, generator: torch.Generator,
             rescale: str = "l1") -> Tensor:
    """Drop entries of one task vector by magnitude-ranked probabilities, then rescale (module docstring)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    work = _work_dtype(delta.dtype)
    probabilities = keep_probabilities(delta, density, epsilon)
    mask = torch.bernoulli(probabilities, generator=generator).to(work)
    values = delta.to(work).reshape(mask.shape)
    masked = values * mask
    if rescale == "l1":
        before, after = values.abs().sum(), masked.abs().sum()
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            masked = masked * (before / after)
    elif rescale == "inverse_probability":
        masked = masked / probabilities  # p ≥ density − ε > 0 wherever an entry can be kept
    return masked.to(delta.dtype).reshape(delta.shape)


MERGEKIT_DEFAULTS = {"density": 1.0, "rescale": "l1"}


def check(params: DellaParams, models: list[DellaModelParams]) -> None:
    if params.normalize and isinstance(params, DellaLinearParams):
        require_nonzero_sum([m.weight for m in models])


def _merge(inputs: MergeInputs, consensus: str | None) -> Tensor:
    params, models = inputs.params, list(inputs.model_params)

    def sparsify(delta: Tensor, index: int) -> Tensor:
        return magprune(delta, models[index].density, models[index].epsilon, inputs.generator(index),
                        params.rescale)

    return merge_task_vectors(inputs.base, inputs.tensors, [m.weight for m in models], sparsify=sparsify,
                              consensus=consensus, normalize=params.normalize, scaling=params.scaling,
                              inplace=inputs.owned)


@register_merge("della", DellaParams, DellaModelParams, base="required", check=check, stochastic=True,
                self_merge={"density": 1.0}, mergekit_defaults=MERGEKIT_DEFAULTS,
                description="magnitude-ranked random drop (MAGPRUNE) + TIES election  (Deep et al. 2024)")
def merge(inputs: MergeInputs) -> Tensor:
    return _merge(inputs, "sum")


@register_merge("della_linear", DellaLinearParams, DellaModelParams, base="required", check=check,
                stochastic=True, self_merge={"density": 1.0}, mergekit_defaults=MERGEKIT_DEFAULTS,
                description="magnitude-ranked random drop (MAGPRUNE) + task arithmetic  (Deep et al. 2024)")
def merge_linear(inputs: MergeInputs) -> Tensor:
    return _merge(inputs, None)

"""SCE — Select, Calculate, Erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024; arXiv
2408.07990), as mergekit 0.1.5's `sce` computes it, per tensor.

With task vectors τ_i = θ_i − θ_0 of the n models:
1. Select: where the models disagree most. v = Var_i(τ_i) entry by entry (population variance); keep the
   k = ⌊select_topk · #{v ≠ 0}⌋ entries of largest v in every τ_i, zero the rest (skipped at select_topk = 1;
   k = 0 keeps nothing).
2. Calculate: one weight per model and tensor, w_i = mean(τ_i²) / Σ_j mean(τ_j²) over the selected τ
   (uniform 1/n when Σ_j mean(τ_j²) < 1e-6, mergekit's guard).
3. Erase: TIES' sign election on the unweighted selected τ, s = sign⁺(Σ_i τ_i) (a zero sum counts as +);
   m_i = [sign τ_i = s] (zeros never agree).
Output θ_0 + Σ_i w_i m_i τ_i / max(Σ_i w_i m_i, 1e-6).

Defaults are mergekit's: select_topk 1.0 (the FuseChat paper's own top-k value is NOT FOUND in our notes).
There are no per-model weights (mergekit's sce has none: the weights come from step 2). Arithmetic is done in
the working dtype with the same torch calls in the same order as mergekit (variance, top-k, sums over a stacked
model axis), so merges are bit-identical with mergekit's for the same working dtype.
Memory: the n task vectors are stacked once (the inputs are released), so a tensor group costs about 2n + 3
tensors at its peak — bounded per tensor like the other methods, never the whole model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra import ops
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge

WEIGHT_SUM_FLOOR = 1e-6  # mergekit: below this the mean-square weights fall back to uniform
DIVISOR_FLOOR = 1e-6  # mergekit: the erased weights' sum is clamped from below at this


@dataclass(frozen=True)
class SceParams:
    """select_topk: fraction of the varying entries (largest variance across the models) kept, in [0, 1].
    int8_mask: no effect (mergekit compatibility)."""

    select_topk: float = 1.0
    int8_mask: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(0.0 <= self.select_topk <= 1.0, "select_topk", self.select_topk,
                     "a fraction in [0, 1] of the entries with the largest variance across the models")


@dataclass(frozen=True)
class SceModelParams:
    """SCE has no per-model parameters: each model's weight is computed from its task vector (step 2)."""

    def __post_init__(self) -> None:
        check_field_types(self)


def selection_mask(task_vectors: Tensor, select_topk: float) -> Tensor:
    """Step 1: 1 at the ⌊select_topk · #nonzero-variance⌋ entries of largest variance across the models."""
    if select_topk <= 0:
        return torch.zeros_like(task_vectors[0])
    if select_topk >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    count = int(torch.count_nonzero(variance) * select_topk)  # as mergekit: the product rounds in float32
    mask = torch.zeros_like(variance)
    if count == 0:
        return mask
    indices = torch.topk(variance.abs().reshape(-1), k=count, largest=True).indices
    mask.view(-1)[indices] = 1
    return mask


def model_weights(task_vectors: Tensor) -> Tensor:
    """Step 2: mean(τ_i²) normalized to sum 1 (uniform when the total is below 1e-6)."""
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < WEIGHT_SUM_FLOOR:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce_merge(base: Tensor, tensors: list[Tensor], select_topk: float = 1.0, release: bool = False) -> Tensor:
    """θ_0 + the SCE-merged task vector (module docstring), in the working dtype of `base`.
    release: empty `tensors` once the task vectors are stacked (the caller hands the list over)."""
    if not tensors:
        return base.clone()
    task_vectors = torch.stack([tensor - base for tensor in tensors], dim=0)
    if release:
        tensors.clear()
    if select_topk < 1:
        task_vectors = task_vectors * selection_mask(task_vectors, select_topk).unsqueeze(0)
    # step 3, TIES' election on the unweighted selected τ: s = sign⁺(Σ_i τ_i), m_i = [sign τ_i = s]
    majority = ops.elect_sign(list(task_vectors), "sum", zero="positive")
    agree = ops.agreement_mask(task_vectors, majority).to(base.dtype)
    del majority
    weights = model_weights(task_vectors).reshape(-1, *([1] * base.dim()))
    erased = weights * agree
    merged = (task_vectors * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=DIVISOR_FLOOR)


@register_merge("sce", SceParams, SceModelParams, base="required", self_merge={},
                description="select high-variance entries, weight by mean square, erase minority signs"
                            "  (Wan et al. 2024, FuseChat)")
def merge(inputs: MergeInputs) -> Tensor:
    return sce_merge(inputs.base, inputs.tensors, inputs.params.select_topk, release=inputs.owned)

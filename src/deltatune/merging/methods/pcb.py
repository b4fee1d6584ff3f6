"""PCB-Merging — Parameter Competition Balancing (Du et al., NeurIPS 2024; official code duguodong7/pcb-merging).

For task vectors T (one row per model), following the official `pcb-merging.py`:

1. outlier clamp: |T_i| is clamped to its [ε, 1 − ε] order statistics (ε = `clamp_fraction`, 1e-4);
2. intra-balancing (self-awareness): β^intra_i = exp(n · Norm(|T_i|)²), Norm = min-max over the row
   (the paper's softmax of n·Norm(τ_i ⊙ τ_i) up to a per-row constant, which the later min-max removes);
3. inter-balancing (cross-awareness): β^inter_i = tanh(T_i ⊙ Σ_j T_j) ("sum", `pcb-merging.py`), or
   Σ_j tanh(T̃_i ⊙ T̃_j) with T̃ = sign(T)·Norm(|T|) ("pairwise", the vision `pcb_ES.py`, closest to the
   paper's Σ_j Softmax(Norm(τ_i ⊙ τ_j)));
4. drop and rescale: β = β^intra ⊙ β^inter is clamped from below at its (1 − r) order statistic and
   min-max normalised, so the bottom 1 − r of each row becomes 0 and the kept top r maps into (0, 1]
   (r = `density`, the code's `pcb_ratio`, default 0.1);
5. merge: τ_m = Σ_i λ_i β̂_i ⊙ T_i / Σ_i β̂_i (clamped values T, λ_i = per-model `weight`), θ = θ_0 + τ_m.

`scope`: "model" computes every order statistic and min-max over the whole model, like the paper, which
flattens all parameters (the streaming layer does this exactly in extra passes); "tensor" (default here, and
what a streaming per-tensor merge can do in one pass) uses each tensor's own statistics — a documented
deviation. Rows whose values are all equal get Norm = 0 (the official code divides by zero there).
The λ_i search (the paper's evolutionary strategy) is
`deltatune.merging.search.coefficients.search_coefficients`, with `pcb_components` making each evaluation a
cheap weighted sum.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra import ops
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, ModelStatistic, register_merge

INTER_VARIANTS = ("sum", "pairwise")
SCOPES = ("tensor", "model")
MAGNITUDE_BOUNDS, SCORE_BOUNDS = "pcb_magnitude_bounds", "pcb_score_bounds"


@dataclass(frozen=True)
class PCBModelParams:
    """weight: λ_i, the model's merge coefficient (searched by the paper's ES; official vision runs use 1.2)."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(self.weight == self.weight, "weight", self.weight, "a finite number")


@dataclass(frozen=True)
class PCBParams:
    """density: r, fraction of each task vector kept after balancing (official `pcb_ratio`, 0.1).
    clamp_fraction: ε of the outlier clamp (1e-4 in `pcb-merging.py`; 0.01 in the vision/NLP experiments).
    inter_balancing: "sum" or "pairwise" (see the module docstring). scope: "tensor" or "model".
    """

    density: float = 0.1
    clamp_fraction: float = 1e-4
    inter_balancing: str = "sum"
    scope: str = "tensor"

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(0.0 < self.density <= 1.0, "density", self.density, "a fraction in (0, 1]",
                     "density is PCB's ratio r of kept entries")
        config_check(0.0 <= self.clamp_fraction < 0.5, "clamp_fraction", self.clamp_fraction, "0 <= ε < 0.5")
        config_check(self.inter_balancing in INTER_VARIANTS, "inter_balancing", self.inter_balancing,
                     f"one of {INTER_VARIANTS}")
        config_check(self.scope in SCOPES, "scope", self.scope, f"one of {SCOPES}")


def _bounds(values: Sequence[Sequence[float]] | None, like: Tensor) -> tuple[Tensor, Tensor] | None:
    if values is None:
        return None
    low = torch.tensor([v[0] for v in values], dtype=like.dtype, device=like.device).unsqueeze(1)
    high = torch.tensor([v[1] for v in values], dtype=like.dtype, device=like.device).unsqueeze(1)
    return low, high


def clamped_magnitudes(deltas: Tensor, clamp_fraction: float, bounds: tuple[Tensor, Tensor] | None = None):
    """Step 1: (|T| clamped per row, row lower bound, row upper bound). `bounds` overrides the order statistics."""
    magnitude = deltas.abs()
    if bounds is None:
        return ops.quantile_clamp(magnitude, clamp_fraction, clamp_fraction)
    low, high = bounds
    return torch.maximum(torch.minimum(magnitude, high), low), low, high


def balancing_scores(deltas: Tensor, params: PCBParams, magnitude_bounds=None) -> tuple[Tensor, Tensor]:
    """Steps 1–3 on a [n, d] matrix of task vectors: (clamped signed task vectors, β = β^intra ⊙ β^inter)."""
    n = deltas.shape[0]
    magnitude, low, high = clamped_magnitudes(deltas, params.clamp_fraction, magnitude_bounds)
    normalized = ops.rowwise_min_max(magnitude, low, high)
    intra = torch.exp(n * normalized.square())
    if params.inter_balancing == "sum":
        inter = torch.tanh(deltas * deltas.sum(dim=0, keepdim=True))
    else:
        signed = deltas.sign() * normalized
        inter = torch.stack([torch.tanh(signed[i] * signed).sum(dim=0) for i in range(n)])
    return deltas.sign() * magnitude, intra * inter


def drop_and_rescale(scores: Tensor, density: float, score_bounds=None) -> Tensor:
    """Step 4: clamp each row of β from below at its (1 − r) order statistic, then row min-max → [0, 1]."""
    if score_bounds is None:
        clamped, low, high = ops.quantile_clamp(scores, 1.0 - density, 0.0)
    else:
        low, high = score_bounds
        clamped = torch.maximum(scores, low)
    return ops.rowwise_min_max(clamped, low, high)


def _widened(deltas: Tensor) -> Tensor:
    """Half types are scored in float32: β̂ drops every entry at or below an order statistic of β, and an entry
    that only one model keeps gets that model's whole delta however small its β̂ (U_i = β̂_i T_i / β̂_i), so
    bfloat16's rounding of exp and tanh would flip whole deltas at the threshold."""
    return deltas.float() if deltas.dtype in (torch.float16, torch.bfloat16) else deltas


def pcb_components(deltas: Tensor, params: PCBParams = PCBParams(), statistics: Mapping | None = None) -> Tensor:
    """U_i = β̂_i ⊙ T_i / Σ_j β̂_j for a [n, ...] stack of task vectors, so that τ_m = Σ_i λ_i U_i (step 5).

    Precompute once, then any λ vector costs one weighted sum: this is what makes the coefficient search cheap.
    """
    shape = deltas.shape
    flat = _widened(deltas.reshape(shape[0], -1))
    statistics = statistics or {}
    clamped, scores = balancing_scores(flat, params, _bounds(statistics.get(MAGNITUDE_BOUNDS), flat))
    scale = drop_and_rescale(scores, params.density, _bounds(statistics.get(SCORE_BOUNDS), flat))
    # the floor keeps 0 / 0 out where every β̂ is 0; 1e-12 itself is 0 in float16, so use the dtype's smallest
    floor = max(1e-12, torch.finfo(scale.dtype).tiny)
    components = scale * clamped / scale.sum(dim=0, keepdim=True).clamp(min=floor)
    return components.reshape(shape).to(deltas.dtype)


def pcb_merge(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], params: PCBParams = PCBParams(),
              statistics: Mapping | None = None) -> Tensor:
    """θ_0 + Σ_i λ_i U_i for one tensor (or for whole flattened models, which is the paper's setting)."""
    deltas = torch.stack([t - base for t in tensors])
    components = pcb_components(deltas, params, statistics)
    lambdas = torch.tensor(list(weights), dtype=components.dtype, device=components.device)
    merged = torch.tensordot(lambdas, components, dims=1)
    return (base + merged).to(base.dtype)


def _stacked_deltas(inputs: MergeInputs) -> Tensor:
    return torch.stack([(t - inputs.base).reshape(-1) for t in inputs.tensors])


def model_statistics(params: PCBParams, models: Sequence[PCBModelParams]) -> list[ModelStatistic]:
    """With scope "model": the clamp bounds of |T_i|, then the drop threshold and maximum of β_i, whole-model."""
    if params.scope != "model":
        return []
    eps, keep = params.clamp_fraction, params.density

    def magnitude_ranks(total: int, index: int) -> list[int]:
        # ascending indices ⌊Dε⌋ and ⌊D(1 − ε)⌋ − 1 (the official clamp) as 1-based ranks from the top
        return [total - min(int(total * eps), total - 1), total - max(int(total * (1 - eps)) - 1, 0)]

    def score_ranks(total: int, index: int) -> list[int]:
        return [total - min(int(total * (1 - keep)), total - 1), 1]

    def scores(inputs: MergeInputs, stats: Mapping) -> list[Tensor]:
        deltas = _widened(_stacked_deltas(inputs))
        _, beta = balancing_scores(deltas, params, _bounds(stats[MAGNITUDE_BOUNDS], deltas))
        return list(beta)

    return [ModelStatistic(MAGNITUDE_BOUNDS, lambda inputs, stats: list(_stacked_deltas(inputs).abs_()),
                           magnitude_ranks),
            ModelStatistic(SCORE_BOUNDS, scores, score_ranks)]


def check(params: PCBParams, models: list[PCBModelParams]) -> None:
    config_check(len(models) >= 1, "models", len(models), "at least one fine-tuned model")


# no self_merge: even at density 1 the lowest score of each row maps to 0 (step 4) and step 1 clamps outliers
@register_merge("pcb", PCBParams, PCBModelParams, base="required", statistics=model_statistics, check=check,
                description="intra/inter parameter-competition balancing, drop, rescale  (Du et al. 2024)")
def merge(inputs: MergeInputs) -> Tensor:
    return pcb_merge(inputs.base, inputs.tensors, [m.weight for m in inputs.model_params], inputs.params,
                     inputs.statistics)

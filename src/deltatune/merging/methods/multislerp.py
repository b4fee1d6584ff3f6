"""Multi-SLERP: weighted barycentric interpolation of any number of models on the hypersphere (mergekit 0.1.5's
`multislerp`; C. Goddard, "Multi-SLERP", goddard.blog), per tensor.

With v_i the flattened models (or task vectors θ_i − θ_0 when a base is given) and weights w_i (divided by
Σ w_i when `normalize_weights`):
    u_i = v_i / (‖v_i‖ + eps)                      — points on the unit sphere;
    μ   = Σ w_i u_i / ‖Σ w_i u_i‖                  — their weighted mean, projected back to the sphere;
    τ   = Σ w_i (u_i − ⟨u_i, μ⟩ μ)                 — the weighted mean of the tangent vectors at μ;
    r   = μ cos ‖τ‖' + τ sin ‖τ‖' / ‖τ‖'           — the exponential map at μ, ‖τ‖' = ‖τ‖ + eps;
    out = r · Σ w_i ‖v_i‖ (+ θ_0)                  — rescaled to the weighted mean norm.
One model is returned as is. Defaults are mergekit's: normalize_weights true, eps 1e-8; mergekit requires
`weight`, here it defaults to 1.0 (equal weights).
Where the weighted mean of the unit vectors vanishes (‖Σ w_i u_i‖ < eps: e.g. task vectors that are all zero,
or opposite ones that balance out), mergekit falls back to the weighted sum Σ w_i v_i for two models and raises
an error for more; here the weighted sum is used for any number of models (the one deviation).
Arithmetic: the working dtype, mergekit's operations in mergekit's order, so merges are bit-identical with
mergekit's for float32 and float64. Half types (float16, bfloat16) are computed in float32 and rounded once;
mergekit computes in the half type, where eps = 1e-8 is 0 in float16 (0/0 = NaN on a zero vector) and the
final θ_0 + offset loses the offset to cancellation in bfloat16 — so half-type merges here are closer to the
float32 merge than mergekit's, not bit-identical with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import MergeError, config_check
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge


@dataclass(frozen=True)
class MultiSlerpParams:
    """normalize_weights: divide the weights by their sum (mergekit's default true). eps: the norm guard."""

    normalize_weights: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(0.0 < self.eps < 1.0, "eps", self.eps, "a small positive number in (0, 1)")


@dataclass(frozen=True)
class MultiSlerpModelParams:
    """weight: the model's barycentric weight (mergekit requires it; default 1.0)."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(self.weight == self.weight, "weight", self.weight, "a finite number")


def multislerp(tensors: list[Tensor], weights: list[float], base: Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """The weighted spherical barycentre of `tensors` (of their offsets from `base` if given), module docstring."""
    if len(tensors) == 1:
        return tensors[0].clone()
    dtype = tensors[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        widened = [t.float() for t in tensors]
        result = multislerp(widened, weights, None if base is None else base.float(), normalize_weights, eps)
        return result.to(dtype)
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:  # no direction to interpolate around: the weighted sum (mergekit's two-model fallback)
        result = stacked[0] * w[0]
        for index in range(1, len(tensors)):
            result = result + stacked[index] * w[index]
        return result + base if base is not None else result
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result + base if base is not None else result


def check(params: MultiSlerpParams, models: list[MultiSlerpModelParams]) -> None:
    weights = [m.weight for m in models]
    if params.normalize_weights and len(models) > 1 and abs(sum(weights)) < 1e-8:
        raise MergeError(f"weights {weights} sum to 0 but normalize_weights: true divides by their sum; "
                         "change a weight or set normalize_weights: false")


@register_merge("multislerp", MultiSlerpParams, MultiSlerpModelParams, base="optional", check=check,
                self_merge={},
                description="weighted spherical barycentre of any number of models  (Goddard; mergekit)")
def merge(inputs: MergeInputs) -> Tensor:
    params = inputs.params
    return multislerp(inputs.tensors, [m.weight for m in inputs.model_params], inputs.base,
                      params.normalize_weights, params.eps)

"""NuSLERP: weighted spherical interpolation of two models, or of their two task vectors when a base is given
(mergekit 0.1.5's `nuslerp`, the successor of its `slerp`; Shoemake 1985 for the arc).

With weights w_1, w_2 the position on the arc is t = w_2 / (w_1 + w_2) (t = 0.5 when |w_1 + w_2| < 1e-6).
Without a base: the result is slerp(t, θ_1, θ_2). With a base: θ_0 + slerp(t, θ_1 − θ_0, θ_2 − θ_0).
slerp(t, v_0, v_1) = [sin((1 − t)Ω) v_0 + sin(tΩ) v_1] / sin Ω with cos Ω = ⟨v_0/‖v_0‖, v_1/‖v_1‖⟩ (norms
clamped from below at 1e-7, cos clamped to [−1, 1]); where 1 − cos²Ω ≤ 1e-16 (colinear) it is the lerp
(1 − t)v_0 + t·v_1.
`nuslerp_flatten: true` (default) takes one angle for the whole tensor; `false` one per row (the last axis is
the vector), or with `nuslerp_row_wise: true` one per column (the vectors run along the first axis) —
mergekit's names. `nuslerp_row_wise` has no effect while `nuslerp_flatten` is true, as in mergekit.

Unlike `slerp` (float32 NumPy), mergekit's nuslerp runs in torch in the working dtype; so does this file, with
the same operations in the same order, so merges are bit-identical with mergekit's for the same working dtype.
mergekit requires `weight`; here it defaults to 1.0 (t = 0.5, the midpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import MergeError, config_check
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge

NORM_FLOOR = 1e-7  # mergekit's clamp on ‖v‖ before normalizing
COLINEAR_EPS = 1e-8  # colinear when 1 − cos² ≤ eps² (mergekit's eps)
WEIGHT_SUM_FLOOR = 1e-6  # |w_1 + w_2| below this: t = 0.5


@dataclass(frozen=True)
class NuSlerpParams:
    """nuslerp_flatten: one angle per tensor (true) or per row/column (false). nuslerp_row_wise: with
    flatten false, interpolate columns (vectors along the first axis) instead of rows."""

    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)


@dataclass(frozen=True)
class NuSlerpModelParams:
    """weight: the model's share; t = w_2 / (w_1 + w_2). mergekit requires it; the default 1.0 gives t = 0.5."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(self.weight == self.weight, "weight", self.weight, "a finite number")


def interpolation_t(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < WEIGHT_SUM_FLOOR else weights[1] / total


def _normalize(vectors: Tensor) -> Tensor:
    return vectors / torch.norm(vectors, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def nuslerp(t: float, v0: Tensor, v1: Tensor, flatten: bool = True, row_wise: bool = False) -> Tensor:
    """The point at `t` on the arc from v0 (t = 0) to v1 (t = 1), along the axis the flags choose."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos_theta = torch.sum(_normalize(v0) * _normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))  # a finite angle on the branch not taken
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def check(params: NuSlerpParams, models: list[NuSlerpModelParams]) -> None:
    if len(models) != 2:
        raise MergeError(f"nuslerp interpolates between exactly two models, got {len(models)} besides the base; "
                         "list two models (or use multislerp for more, slerp for one model and the base)")


@register_merge("nuslerp", NuSlerpParams, NuSlerpModelParams, base="optional", check=check, min_models=2,
                max_models=2, self_merge={},
                description="weighted SLERP of two models (or of their task vectors from a base)  (mergekit)")
def merge(inputs: MergeInputs) -> Tensor:
    check(inputs.params, list(inputs.model_params))
    t = interpolation_t([m.weight for m in inputs.model_params])
    first, second = inputs.tensors
    flags = {"flatten": inputs.params.nuslerp_flatten, "row_wise": inputs.params.nuslerp_row_wise}
    if inputs.base is None:
        return nuslerp(t, first, second, **flags)
    return inputs.base + nuslerp(t, first - inputs.base, second - inputs.base, **flags)

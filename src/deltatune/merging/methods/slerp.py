"""SLERP: spherical linear interpolation between the base and one model (Shoemake, "Animating rotation with
quaternion curves", SIGGRAPH 1985; mergekit's `slerp`, the most used two-model merge).

Per tensor, with both flattened: θ₀ = arccos(⟨v₀/‖v₀‖, v₁/‖v₁‖⟩) and
    slerp(t) = sin((1 − t)θ₀)/sin θ₀ · v₀ + sin(tθ₀)/sin θ₀ · v₁,
v₀ the base (t = 0) and v₁ the model (t = 1). Nearly colinear tensors (|cos θ₀| > 0.9995) are interpolated
linearly, (1 − t)v₀ + t·v₁, where sin θ₀ → 0 would divide by almost nothing; a norm ≤ 1e-8 is not normalized.
`t` is a shared parameter and may be a gradient over the layers or a list of filters (`t: [0, 0.5, 1]`,
`- filter: self_attn ...`), as in mergekit.

Arithmetic: mergekit 0.1.5 computes in float32 NumPy whatever the input dtype and casts the result back; this
file does the same operations in the same order (norms, the dot of the normalized copies, the scalar angle in
float32) so that float32 and bfloat16 merges are bit-identical with mergekit's. float64 inputs are computed in
float64 (mergekit would round them to float32). mergekit requires `t`; here it defaults to 0.5, the midpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deltatune.errors import MergeError, config_check
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge

COLINEAR = 0.9995  # |cos θ₀| above this: linear interpolation (mergekit's DOT_THRESHOLD)
NORM_EPS = 1e-8  # a norm at or below this leaves the vector unnormalized (mergekit's eps)


@dataclass(frozen=True)
class SlerpParams:
    """t: the position on the arc, 0 = the base, 1 = the model (mergekit: required; a gradient or filters)."""

    t: float = 0.5

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(0.0 <= self.t <= 1.0, "t", self.t, "a number in [0, 1] (0 = the base, 1 = the model)")


@dataclass(frozen=True)
class SlerpModelParams:
    """SLERP has no per-model parameter (the one model is the arc's end)."""


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    return vector / norm if norm > NORM_EPS else vector


def slerp(t: float, start: Tensor, end: Tensor) -> Tensor:
    """The point at `t` on the arc from `start` (t = 0) to `end` (t = 1), in `start`'s dtype (module docstring)."""
    wide = torch.float64 if start.dtype == torch.float64 else torch.float32
    v0 = start.detach().cpu().to(wide).numpy()
    v1 = end.detach().cpu().to(wide).numpy()
    cosine = np.sum(_unit(v0) * _unit(v1))
    if np.abs(cosine) > COLINEAR:
        result = (1 - t) * v0 + t * v1
    else:
        angle = np.arccos(cosine)
        sine = np.sin(angle)
        result = np.sin(angle - angle * t) / sine * v0 + np.sin(angle * t) / sine * v1
    return torch.from_numpy(np.asarray(result, dtype=v0.dtype)).to(dtype=start.dtype, device=start.device)


def check(params: SlerpParams, models: list[SlerpModelParams]) -> None:
    if len(models) != 1:
        raise MergeError(f"slerp interpolates between base_model and exactly one model, got {len(models)} models "
                         "besides the base; list one model (or use linear / task_arithmetic / model_stock for more)")


@register_merge("slerp", SlerpParams, SlerpModelParams, base="required", check=check, max_models=1,
                self_merge={"t": 1.0},
                description="spherical interpolation base → model at t, per tensor  (Shoemake 1985; mergekit)")
def merge(inputs: MergeInputs) -> Tensor:
    return slerp(inputs.params.t, inputs.base, inputs.tensors[0])

"""SLERP: spherical linear interpolation between the base model and one other model (Shoemake, "Animating
rotation with quaternion curves", SIGGRAPH 1985), per tensor, with mergekit 0.1.5's semantics.

Each tensor is flattened to one vector. With u_0, u_1 the inputs divided by their norms (left as they are when
a norm is <= 1e-8) and d = <u_0, u_1>: if |d| > 0.9995 the two are treated as colinear and the result is the
plain interpolation (1 − t) θ_0 + t θ_1; otherwise, with Ω = arccos d,
θ = sin((1 − t) Ω) / sin Ω · θ_0 + sin(t Ω) / sin Ω · θ_1 — the coefficients act on the *unnormalised*
tensors, as in mergekit. t = 0 is the base model, t = 1 the other one; `t` may be a gradient over layers
(`t: [0, 0.5, 1]`) or a list of `{filter, value}` conditions, resolved per tensor by the config layer.
Computed in float32 as mergekit (which converts to float32 numpy; float64 inputs stay float64 here),
returned in the inputs' dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import MergeError, config_check
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge

COLINEAR_THRESHOLD = 0.9995
NORM_EPS = 1e-8


@dataclass(frozen=True)
class SlerpParams:
    """t: interpolation factor in [0, 1] (0 = base model, 1 = the other model); required in mergekit."""

    t: float = 0.5

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(0.0 <= self.t <= 1.0, "t", self.t, "a number in [0, 1] (0 = base model, 1 = the other)")


@dataclass(frozen=True)
class SlerpModelParams:
    """SLERP has no per-model parameters."""

    def __post_init__(self) -> None:
        check_field_types(self)


def _unit(vector: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(vector)
    return vector / norm if norm.item() > NORM_EPS else vector


def slerp(t: float, start: Tensor, end: Tensor) -> Tensor:
    """Spherical interpolation from `start` (t = 0) to `end` (t = 1), falling back to lerp when colinear."""
    wide = torch.float64 if start.dtype == torch.float64 else torch.float32
    v0 = start.detach().reshape(-1).to(wide)
    v1 = end.detach().reshape(-1).to(wide)
    dot = torch.dot(_unit(v0), _unit(v1)).item()
    if abs(dot) > COLINEAR_THRESHOLD:
        mixed = (1 - t) * v0 + t * v1
    else:
        omega = math.acos(dot)
        sin_omega = math.sin(omega)
        mixed = (math.sin(omega - omega * t) / sin_omega) * v0 + (math.sin(omega * t) / sin_omega) * v1
    return mixed.reshape(start.shape).to(start.dtype)


def check(params: SlerpParams, models: list[SlerpModelParams]) -> None:
    if len(models) != 1:
        raise MergeError(f"slerp merges exactly two models (base_model and one other); got {len(models)} "
                         "besides the base: list one model under `models` (use multislerp/linear for more)")


@register_merge("slerp", SlerpParams, SlerpModelParams, base="required", check=check, self_merge={"t": 1.0},
                max_models=1,
                description="spherical interpolation between base and one model  (Shoemake 1985; mergekit)")
def merge(inputs: MergeInputs) -> Tensor:
    if len(inputs.tensors) != 1:
        check(inputs.params, list(inputs.model_params))
    return slerp(inputs.params.t, inputs.base, inputs.tensors[0])

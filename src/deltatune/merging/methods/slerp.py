"""SLERP: spherical linear interpolation between the base and one model (Shoemake, "Animating rotation with
quaternion curves", SIGGRAPH 1985; mergekit's `slerp`, the most used two-model merge).

Per tensor, with both flattened: θ₀ = arccos(⟨v₀/‖v₀‖, v₁/‖v₁‖⟩) and
    slerp(t) = sin((1 − t)θ₀)/sin θ₀ · v₀ + sin(tθ₀)/sin θ₀ · v₁,
v₀ the base (t = 0) and v₁ the model (t = 1). Nearly colinear tensors (|cos θ₀| > 0.9995) are interpolated
linearly, (1 − t)v₀ + t·v₁, where sin θ₀ → 0 would divide by almost nothing; a norm ≤ 1e-8 is not normalized.
`t` is a shared parameter and may be a gradient over the layers or a list of filters (`t: [0, 0.5, 1]`,
`- filter: self_attn ...`), as in mergekit.

Arithmetic: mergekit 0.1.5's `slerp` runs in torch in float32 whatever the input dtype (float64 stays float64)
and returns float32 (the writer casts to the output dtype): norms of the whole flattened tensor (as the norm of
chunk norms, chunks of 2^20 entries), the dot of the normalized copies, the coefficients
sin((1 − t)θ₀)/sin θ₀ and sin(tθ₀)/sin θ₀ in float32, then coef_a·v₀ + coef_b·v₁. This file does the same
operations in the same order, so float32 merges are bit-identical with mergekit's (checked against real
mergekit-yaml output in tests/merging/test_mergekit_parity.py); the result is rounded to the input dtype once.
mergekit packs same-shape tensors into one batch and shrinks the chunk to 2^20 / (batch size) entries, so for
tensors above that size its norm may differ from this one in the last bit (not seen on a 20480×64 embedding
and lm_head pair, 1.3M entries each, which came out bit-identical). mergekit requires `t`; here it
defaults to 0.5, the midpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

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


CHUNK = 1 << 20  # entries per chunk of mergekit's norm (batch of one tensor)


def slerp(t: float, start: Tensor, end: Tensor) -> Tensor:
    """The point at `t` on the arc from `start` (t = 0) to `end` (t = 1), in `start`'s dtype (module docstring)."""
    wide = torch.float64 if start.dtype == torch.float64 else torch.float32
    a, b = start.reshape(1, -1), end.reshape(1, -1)
    position = torch.tensor([[t]], dtype=wide, device=start.device)
    if a.shape[1] == 0:
        return start.clone()

    def chunks(values: Tensor):
        return (values[:, i:i + CHUNK].to(wide) for i in range(0, values.shape[1], CHUNK))

    def norm(values: Tensor) -> Tensor:  # norm of the chunk norms, as mergekit
        parts = torch.stack([torch.linalg.vector_norm(c, dim=1, keepdim=True) for c in chunks(values)])
        total = torch.linalg.vector_norm(parts, dim=0)
        return torch.where(total > NORM_EPS, total, 1)

    norm_a, norm_b = norm(a), norm(b)
    dot = torch.stack([(x / norm_a * (y / norm_b)).sum(dim=1, keepdim=True)
                       for x, y in zip(chunks(a), chunks(b))]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > COLINEAR
    theta = torch.acos(torch.where(linear, 0, dot))  # a finite angle on the branch not taken
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - position, torch.sin((1 - position) * theta) / sin_theta)
    coef_b = torch.where(linear, position, torch.sin(position * theta) / sin_theta)
    result = torch.empty(a.shape, dtype=wide, device=start.device)
    for i, (x, y) in enumerate(zip(chunks(a), chunks(b))):
        result[:, i * CHUNK:i * CHUNK + x.shape[1]] = coef_a * x + coef_b * y
    return result.reshape(start.shape).to(start.dtype)


def check(params: SlerpParams, models: list[SlerpModelParams]) -> None:
    if len(models) != 1:
        raise MergeError(f"slerp interpolates between base_model and exactly one model, got {len(models)} models "
                         "besides the base; list one model (or use linear / task_arithmetic / model_stock for more)")


@register_merge("slerp", SlerpParams, SlerpModelParams, base="required", check=check, max_models=1,
                self_merge={"t": 1.0},
                description="spherical interpolation base → model at t, per tensor  (Shoemake 1985; mergekit)")
def merge(inputs: MergeInputs) -> Tensor:
    return slerp(inputs.params.t, inputs.base, inputs.tensors[0])

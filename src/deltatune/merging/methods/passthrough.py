"""Passthrough: copy one model's tensor unchanged (optionally scaled) — mergekit's `passthrough`, the method of
layer-stacking merges ("frankenmerges", depth up-scaling as in SOLAR, Kim et al. 2023).

With the `slices:` form (`deltatune.merging.io.slices`) every output slice takes its layers from exactly one
source model; stacking `layer_range: [0, 24]` and `[8, 32]` of a 32-layer model gives a 48-layer model. With the
`models:` form it copies the single listed model. Per tensor: θ_out = θ (scale unset) or scale · θ, computed as
`tensor * scale` in the working dtype exactly as mergekit 0.1.5 does, so outputs are bit-identical with it.
No base model is used (mergekit ignores one too).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deltatune.errors import MergeError
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge


@dataclass(frozen=True)
class PassthroughModelParams:
    """scale: multiply the copied tensor by this (unset: copy it bit for bit; mergekit's `scale`)."""

    scale: float | None = None

    def __post_init__(self) -> None:
        check_field_types(self)


@dataclass(frozen=True)
class PassthroughParams:
    """Passthrough has no shared parameter."""


def check(params: PassthroughParams, models: list[PassthroughModelParams]) -> None:
    if len(models) != 1:
        raise MergeError(f"passthrough copies exactly one model per tensor, got {len(models)}; give each slice "
                         "one source (or use linear / slerp / task_arithmetic to combine models)")


@register_merge("passthrough", PassthroughParams, PassthroughModelParams, base="unused", check=check,
                max_models=1, self_merge={},
                description="copy one model's tensors (optionally scaled); with slices: layer stacking  (mergekit)")
def merge(inputs: MergeInputs) -> Tensor:
    scale = inputs.model_params[0].scale
    tensor = inputs.tensors[0]
    if scale is None:  # a copy unless the caller handed the buffer over: the output never aliases an input
        return tensor if inputs.owned else tensor.clone()
    return tensor * scale

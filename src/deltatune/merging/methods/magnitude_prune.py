"""Magnitude pruning of task vectors, then task arithmetic (the DARE paper's magnitude baseline; peft's
`magnitude_prune` combination).

Each δ_i keeps its ⌊density·n⌋ largest-magnitude entries per tensor (no rescale by default, as in the DARE
paper's baseline), then θ = θ_0 + λ Σ w_i δ̂_i. Default density 0.1 (drop 90%), matching `dare_linear`'s
default so the two compare at equal sparsity.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra.family import TaskModelParams, boolean_rescale, magnitude_sparsifier, merge_task_vectors
from deltatune.merging.algebra.ops import TIE_BREAKS
from deltatune.merging.params import check_field_types, require_nonzero_sum
from deltatune.merging.registry import MergeInputs, register_merge


@dataclass(frozen=True)
class MagnitudeModelParams(TaskModelParams):
    """weight w_i; density: fraction of entries kept per tensor."""

    density: float = 0.1


@dataclass(frozen=True)
class MagnitudePruneParams:
    """scaling: λ (YAML `lambda`). normalize: divide by Σ w_i. rescale: "none" (paper baseline) or "l1".
    tie_break: entries tied with the cut-off — "all", "index" or "argsort" (see `ops.magnitude_keep_mask`)."""

    scaling: float = 1.0
    normalize: bool = False
    rescale: str = "none"
    tie_break: str = "all"

    def __post_init__(self) -> None:
        boolean_rescale(self, true_means="l1")
        check_field_types(self)
        config_check(self.tie_break in TIE_BREAKS, "tie_break", self.tie_break, f"one of {TIE_BREAKS}")
        config_check(self.rescale in ("none", "l1"), "rescale", self.rescale, "'none' or 'l1'")


def check(params: MagnitudePruneParams, models: list[TaskModelParams]) -> None:
    if params.normalize:
        require_nonzero_sum([m.weight for m in models])


@register_merge("magnitude_prune", MagnitudePruneParams, MagnitudeModelParams, base="required", check=check,
                self_merge={"density": 1.0},
                description="keep the largest-magnitude delta entries, then task arithmetic")
def merge(inputs: MergeInputs) -> Tensor:
    models = inputs.model_params
    sparsify = magnitude_sparsifier([m.density for m in models], inputs.params.rescale,
                                    tie_break=inputs.params.tie_break)
    return merge_task_vectors(inputs.base, inputs.tensors, [m.weight for m in models], sparsify=sparsify,
                              normalize=inputs.params.normalize, scaling=inputs.params.scaling,
                              inplace=inputs.owned)

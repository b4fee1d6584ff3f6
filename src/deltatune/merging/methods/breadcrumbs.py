"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling multi-task model merging with sparse
masks", ECCV 2024): per tensor, drop the `gamma` fraction of task-vector entries with the largest magnitude
(outliers) and the smallest ones, so that a `density` fraction is kept; then task arithmetic (`breadcrumbs`)
or TIES' sign election and disjoint sum (`breadcrumbs_ties`), as mergekit 0.1.5's methods of those names.

Counts follow mergekit: of n entries, ⌊density·n⌋ are kept and ⌊gamma·n⌋ dropped from the top; when the two
overlap, fewer outliers are dropped so the density holds. Ranks come from the same ascending `torch.sort` of
|δ| (in float32) that mergekit 0.1.5 uses, keeping the sorted positions [n_bot, n_bot + ⌊density·n⌋), so
entries tied in |δ| (common in bfloat16) are chosen as mergekit chooses them — deterministic for a given torch
build, not by position; the output is matched bit for bit in test_mergekit_parity.py (float32 and bfloat16). (An
older mergekit slice, `[n_bot:-n_top]`, kept nothing when ⌊gamma·n⌋ = 0; 0.1.5 no longer does.) No rescale
(mergekit's default for both methods).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra.family import TaskModelParams, merge_task_vectors
from deltatune.merging.params import check_field_types, require_nonzero_sum
from deltatune.merging.registry import MergeInputs, register_merge


@dataclass(frozen=True)
class BreadcrumbsModelParams(TaskModelParams):
    """weight w_i; density: fraction of entries kept; gamma: fraction of largest-|δ| entries dropped.

    The paper's recommended β/γ are not in our notes: density 0.9 is our default (not verified against the
    paper), gamma 0.01 is mergekit's; a mergekit YAML gets mergekit's density 1.0."""

    density: float = 0.9
    gamma: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(0.0 <= self.density <= 1.0, "density", self.density, "a fraction in [0, 1] of entries kept")
        config_check(0.0 <= self.gamma <= 1.0, "gamma", self.gamma, "a fraction in [0, 1] of outliers dropped")


@dataclass(frozen=True)
class BreadcrumbsParams:
    """scaling: λ (YAML `lambda`). normalize: divide by Σ w_i (mergekit's default false)."""

    scaling: float = 1.0
    normalize: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(self.scaling == self.scaling, "scaling", self.scaling, "a finite number (λ)")


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Keep mask: the entries ranked (by ascending |δ|) from n − ⌊density·n⌋ − ⌊gamma·n⌋ to n − ⌊gamma·n⌋."""
    count = delta.numel()
    kept, top = int(density * count), int(gamma * count)
    bottom = count - kept - top
    if bottom < 0:  # the outlier cut eats into the kept fraction: drop fewer outliers instead
        top, bottom = top + bottom, 0
    order = torch.sort(delta.abs().reshape(-1).float()).indices  # mergekit's (unstable) sort: its choice among ties
    mask = torch.zeros(count, dtype=torch.bool, device=delta.device)
    mask[order[bottom:count - top]] = True
    return mask.reshape(delta.shape)


def breadcrumbs_sparsifier(models: list[BreadcrumbsModelParams]):
    def sparsify(delta: Tensor, index: int) -> Tensor:
        if models[index].density >= 1.0:
            return delta
        return delta * breadcrumbs_mask(delta, models[index].density, models[index].gamma)
    return sparsify


def check(params: BreadcrumbsParams, models: list[BreadcrumbsModelParams]) -> None:
    if params.normalize:
        require_nonzero_sum([m.weight for m in models])


def _merge(inputs: MergeInputs, consensus: str | None) -> Tensor:
    models = list(inputs.model_params)
    return merge_task_vectors(inputs.base, inputs.tensors, [m.weight for m in models],
                              sparsify=breadcrumbs_sparsifier(models), consensus=consensus,
                              normalize=inputs.params.normalize, scaling=inputs.params.scaling,
                              inplace=inputs.owned)


@register_merge("breadcrumbs", BreadcrumbsParams, BreadcrumbsModelParams, base="required", check=check,
                mergekit_defaults={"density": 1.0}, self_merge={"density": 1.0},
                description="drop outliers and small entries of each task vector, then task arithmetic"
                            "  (Davari & Belilovsky 2024)")
def merge(inputs: MergeInputs) -> Tensor:
    return _merge(inputs, None)


@register_merge("breadcrumbs_ties", BreadcrumbsParams, BreadcrumbsModelParams, base="required", check=check,
                mergekit_defaults={"density": 1.0}, self_merge={"density": 1.0},
                description="breadcrumbs masks, then TIES sign election and disjoint sum  (Davari 2024)")
def merge_ties(inputs: MergeInputs) -> Tensor:
    return _merge(inputs, "sum")

"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

Per model: trim the task vector to its top-k% entries by magnitude (§3 step 1), elect a sign per entry from the
summed trimmed values (step 2), average only the entries that agree with it (step 3, disjoint mean), add λ × the
result to the base.

Paper defaults (the Python API): k = 20% (density 0.2), λ = 1, the trim over the **whole model**
(`trim_scope="model"`, as the official code flattens all parameters), the sign elected from **unweighted**
trimmed vectors, zero sums resolved to the majority sign.
mergekit semantics (a mergekit YAML, `semantics: mergekit`): density 1.0, trimming per tensor, weights applied
before the election (`sign_from="weighted"`, mergekit issue #474), zero sums → +1, `normalize` dividing by the
agreeing weights. Both give the paper's disjoint mean when all weights are 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra import ops
from deltatune.merging.algebra.family import (
    TaskModelParams,
    boolean_rescale,
    check_consensus_normalize,
    check_consensus_options,
    magnitude_sparsifier,
    merge_task_vectors,
)
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, ModelStatistic, register_merge

SCOPES = ("tensor", "model")
TRIM_THRESHOLD = "trim_threshold"


@dataclass(frozen=True)
class TiesModelParams(TaskModelParams):
    """weight w_i (mergekit's generalisation; the paper has none) and density k (paper default 20%)."""

    density: float = 0.2


@dataclass(frozen=True)
class TiesParams:
    """scaling: λ (YAML `lambda`). normalize: divide by the agreeing weights (the disjoint mean; True), by the
    number of agreeing models ("count", peft's weighted TIES) or not at all (False).
    sign_election: "sum" (paper, mass) or "count" (sign votes). sign_from: "unweighted" (paper) or "weighted"
    (mergekit). zero_sign: "majority" (paper code) or "positive" (mergekit). trim_scope: "model" (paper) or
    "tensor" (mergekit, peft). rescale: "none" or "l1" (mergekit's `rescale: true`). tie_break: entries tied
    with the k-th largest |δ| — "all" kept (TIES code), "index" (exactly k, by position) or "argsort" (exactly
    mergekit's choice). int8_mask: no effect.
    """

    scaling: float = 1.0
    normalize: bool | str = True
    sign_election: str = "sum"
    sign_from: str = "unweighted"
    zero_sign: str = "majority"
    trim_scope: str = "model"
    rescale: str = "none"
    tie_break: str = "all"
    int8_mask: bool = False

    def __post_init__(self) -> None:
        boolean_rescale(self, true_means="l1")
        check_field_types(self)
        config_check(self.tie_break in ops.TIE_BREAKS, "tie_break", self.tie_break, f"one of {ops.TIE_BREAKS}")
        check_consensus_options(self.sign_election, self.sign_from, self.zero_sign)
        check_consensus_normalize(self.normalize)
        config_check(self.trim_scope in SCOPES, "trim_scope", self.trim_scope, f"one of {SCOPES}")
        config_check(self.rescale in ("none", "l1"), "rescale", self.rescale, "'none' or 'l1'")


def ties_merge(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
               params: TiesParams = TiesParams(), thresholds: list[float] | None = None,
               inplace: bool = False) -> Tensor:
    """TIES on one tensor (or on whole flattened models). `thresholds`: whole-model |δ| cut-offs per model."""
    sparsify = magnitude_sparsifier(densities, params.rescale, thresholds, params.tie_break)
    return merge_task_vectors(base, tensors, weights, sparsify=sparsify, consensus=params.sign_election,
                              sign_from=params.sign_from, zero_sign=params.zero_sign,
                              normalize=params.normalize, scaling=params.scaling, inplace=inplace)


def trim_statistics(params, models: list[TaskModelParams]) -> list[ModelStatistic]:
    """With trim_scope "model": per model, the k-th largest |δ| over the whole model (k = ⌊density·D⌋)."""
    if params.trim_scope != "model" or all(m.density >= 1.0 for m in models):
        return []
    return [ModelStatistic(
        TRIM_THRESHOLD,
        score=lambda inputs, stats: [(t - inputs.base).abs_() for t in inputs.tensors],
        ranks=lambda total, index: [max(ops.keep_count(total, models[index].density), 1)],
    )]


def model_thresholds(inputs: MergeInputs) -> list[float] | None:
    """Whole-model cut-offs when the stream computed them (−∞ keeps a whole model, +∞ drops it)."""
    if TRIM_THRESHOLD not in inputs.statistics:
        return None
    cuts = []
    for values, model in zip(inputs.statistics[TRIM_THRESHOLD], inputs.model_params):
        cuts.append(float("-inf") if model.density >= 1.0 else float("inf") if model.density <= 0 else values[0])
    return cuts


MERGEKIT = {"density": 1.0, "sign_from": "weighted", "zero_sign": "positive", "trim_scope": "tensor",
            "tie_break": "argsort"}


@register_merge("ties", TiesParams, TiesModelParams, base="required", mergekit_defaults=MERGEKIT,
                statistics=trim_statistics, self_merge={"density": 1.0},
                mergekit_values={"rescale": {True: "l1", False: "none"}},
                description="trim top-k by magnitude, elect sign, disjoint mean  (Yadav et al. 2023)")
def merge(inputs: MergeInputs) -> Tensor:
    models = inputs.model_params
    return ties_merge(inputs.base, inputs.tensors, [m.weight for m in models], [m.density for m in models],
                      inputs.params, model_thresholds(inputs), inplace=inputs.owned)

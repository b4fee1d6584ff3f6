"""DARE — Drop And REscale (Yu et al., "Language Models are Super Mario", ICML 2024), as a merge.

Each task vector loses every entry with probability p and the survivors are divided by 1 − p (Eq. 1–2), which
keeps the delta unbiased in expectation; the sparse deltas are then merged by task arithmetic (`dare_linear`)
or TIES' sign election and disjoint mean (`dare_ties`).

Paper defaults (the Python API): drop rate p = 0.9 (density 0.1, the paper's headline "90% of delta parameters"),
rescale 1/(1 − p), λ = 1, and for dare_ties the TIES paper's election (unweighted, zero → majority sign).
mergekit semantics: density 1.0, `rescale: true` = **L1-norm matching** (mergekit replaced 1/(1 − p) in
2025-02), `normalize: false`, weighted election, zero → +1. Random masks come from a per-(tensor, model)
seeded generator, so a merge is reproducible and independent of the order tensors are processed in; mergekit
uses the global torch RNG, so a merge here matches mergekit's in distribution, not entry by entry. The draw
(`torch.rand < density`) is the same stream and comparison as mergekit's `torch.bernoulli(full(density))`, so
fed mergekit's generator in mergekit's tensor order, dare_ties and dare_linear give mergekit's tensors bit for
bit in float32, float16 and bfloat16 (tests/merging/test_mergekit_parity.py), which proves the rescale, sign
election and normalisation equal. As mergekit, float16 is masked and rescaled in float32 and rounded once.
One deviation: mergekit draws bfloat16 masks at bfloat16(density) (0.7 → 0.69921875); here the density given.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra.family import (
    TaskModelParams,
    boolean_rescale,
    check_consensus_normalize,
    check_consensus_options,
    merge_task_vectors,
    random_sparsifier,
)
from deltatune.merging.params import check_field_types, require_nonzero_sum
from deltatune.merging.registry import MergeInputs, register_merge

DARE_RESCALES = ("inverse_density", "l1", "none")


@dataclass(frozen=True)
class DareModelParams(TaskModelParams):
    """weight w_i; density 1 − p, the fraction of delta entries kept (paper headline: p = 0.9)."""

    density: float = 0.1


@dataclass(frozen=True)
class DareParams:
    """scaling: λ (YAML `lambda`). normalize: divide by Σ w_i. rescale: "inverse_density" (paper, 1/(1 − p)),
    "l1" (mergekit's `rescale: true`), "none" (DropOnly). int8_mask: no effect (mergekit compatibility).
    """

    scaling: float = 1.0
    normalize: bool = False
    rescale: str = "inverse_density"
    int8_mask: bool = False

    def __post_init__(self) -> None:
        boolean_rescale(self, true_means="inverse_density")
        check_field_types(self)
        config_check(self.rescale in DARE_RESCALES, "rescale", self.rescale, f"one of {DARE_RESCALES}")


@dataclass(frozen=True)
class DareTiesParams(DareParams):
    """DareParams plus TIES' election: sign_election "sum"/"count", sign_from "unweighted" (TIES paper) or
    "weighted" (mergekit), zero_sign "majority" or "positive"; normalize may also be "count" (divide by the
    number of agreeing models, peft's `dare_ties`)."""

    normalize: bool | str = False

    sign_election: str = "sum"
    sign_from: str = "unweighted"
    zero_sign: str = "majority"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_consensus_options(self.sign_election, self.sign_from, self.zero_sign)
        check_consensus_normalize(self.normalize)


def dare_merge(inputs: MergeInputs, consensus: bool) -> Tensor:
    params, models = inputs.params, inputs.model_params
    sparsify = random_sparsifier([m.density for m in models], inputs.generator, params.rescale)
    options = {}
    if consensus:
        options = {"consensus": params.sign_election, "sign_from": params.sign_from,
                   "zero_sign": params.zero_sign}
    return merge_task_vectors(inputs.base, inputs.tensors, [m.weight for m in models], sparsify=sparsify,
                              normalize=params.normalize, scaling=params.scaling, inplace=inputs.owned, **options)


def check(params: DareParams, models: list[TaskModelParams]) -> None:
    if params.normalize and not isinstance(params, DareTiesParams):
        require_nonzero_sum([m.weight for m in models])


MERGEKIT_VALUES = {"rescale": {True: "l1", False: "none"}}


@register_merge("dare_linear", DareParams, DareModelParams, base="required", check=check, stochastic=True,
                self_merge={"density": 1.0},
                mergekit_defaults={"density": 1.0, "rescale": "l1"}, mergekit_values=MERGEKIT_VALUES,
                description="drop p of each delta, rescale by 1/(1-p), task arithmetic  (Yu et al. 2024)")
def merge_linear(inputs: MergeInputs) -> Tensor:
    return dare_merge(inputs, consensus=False)


@register_merge("dare_ties", DareTiesParams, DareModelParams, base="required", mergekit_values=MERGEKIT_VALUES,
                stochastic=True, self_merge={"density": 1.0},
                mergekit_defaults={"density": 1.0, "rescale": "l1", "sign_from": "weighted",
                                   "zero_sign": "positive"},
                description="DARE sparsification + TIES sign election and disjoint merge  (Yu et al. 2024)")
def merge_ties(inputs: MergeInputs) -> Tensor:
    return dare_merge(inputs, consensus=True)

"""DAREx-q (Deng et al., "DARE the Extreme: Revisiting Delta-Parameter Pruning for Fine-Tuned Models",
ICLR 2025; official code vengdeng/DAREx): DARE with the rescaling factor 1/q instead of 1/(1 − p).

At high drop rates 1/(1 − p) inflates the variance of the pruned model's outputs; dividing by a q with
1 − p ≤ q ≤ 1 trades a small bias for much less variance (§4). q is chosen per model (global q) or per tensor
(per-layer q, e.g. from `deltatune.merging.search.darex_q.analytical_layer_q`), through YAML filters or a q map.
How to choose q — a grid search on a validation metric, or on the output change on unlabelled inputs — is in
`deltatune.merging.search.darex_q`. With one model this is delta-parameter pruning (`deltatune prune --method darex`);
with several, a DARE-style task-arithmetic merge of the pruned deltas.

Defaults: keep rate 0.01 (p = 0.99, the DAREx repo's default `--p 0.01`), q unset = 1 − p (plain DARE) —
set q from a search; the paper's point is that the best q differs from 1 − p.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra.family import merge_task_vectors, random_sparsifier
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge


@dataclass(frozen=True)
class DarexModelParams:
    """weight: w_i. density: 1 − p, fraction kept (0.01 = 99% pruned). q: rescale divisor in (0, 1]; the
    paper searches it in [1 − p, 1]; None means 1 − p (DARE). q divides the delta also where nothing is
    dropped (density 1), as δ̂ = m ⊙ δ / q and the official `rescale_v` do; a tensor to leave untouched
    (a head) needs q: 1 as well (`deltatune prune --keep` sets both)."""

    weight: float = 1.0
    density: float = 0.01
    q: float | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(self.weight == self.weight, "weight", self.weight, "a finite number")
        config_check(0.0 < self.density <= 1.0, "density", self.density, "a fraction in (0, 1]",
                     "density = 1 - drop rate")
        config_check(self.q is None or 0.0 < self.q <= 1.0, "q", self.q, "a divisor in (0, 1]",
                     "DAREx-q searches q between 1 - p (DARE) and 1 (no rescale)")

    @property
    def divisor(self) -> float:
        return self.density if self.q is None else self.q


@dataclass(frozen=True)
class DarexParams:
    """scaling: λ (YAML `lambda`) applied to Σ w_i δ̂_i."""

    scaling: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)


def darex_merge(base: Tensor, tensors: list[Tensor], models: list[DarexModelParams], generator,
                scaling: float = 1.0, inplace: bool = False) -> Tensor:
    """θ_0 + λ Σ_i w_i · drop_p(δ_i) / q_i on one tensor; `generator(i)` gives model i's seeded generator."""
    sparsify = random_sparsifier([m.density for m in models], generator, "divisor", [m.divisor for m in models])
    return merge_task_vectors(base, tensors, [m.weight for m in models], sparsify=sparsify, scaling=scaling,
                              inplace=inplace)


@register_merge("darex", DarexParams, DarexModelParams, base="required", stochastic=True,
                self_merge={"density": 1.0},
                description="DARE with rescale 1/q, q searched per model or per layer  (Deng et al. 2025)")
def merge(inputs: MergeInputs) -> Tensor:
    return darex_merge(inputs.base, inputs.tensors, list(inputs.model_params), inputs.generator,
                       inputs.params.scaling, inplace=inputs.owned)

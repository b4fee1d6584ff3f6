"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

θ = θ_0 + λ Σ_i w_i τ_i with τ_i = θ_i − θ_0 (§2: addition; a negative w_i is negation). The paper uses one λ
chosen on validation data and w_i = 1; `weight` per model is mergekit's generalisation. `normalize: true`
divides by Σ w_i (then λ scales a weighted mean).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.algebra.family import TaskModelParams, merge_task_vectors
from deltatune.merging.params import check_field_types, require_nonzero_sum
from deltatune.merging.registry import MergeInputs, register_merge


@dataclass(frozen=True)
class TaskArithmeticParams:
    """scaling: λ (YAML `lambda`), 1.0 as in mergekit (the paper tunes it on validation data).
    normalize: divide by Σ w_i. rescale, int8_mask: accepted for mergekit compatibility; no effect here
    (task arithmetic has no sparsification, and no mask is ever materialised for all models at once).
    """

    scaling: float = 1.0
    normalize: bool = False
    rescale: bool = False
    int8_mask: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(self.scaling == self.scaling, "scaling", self.scaling, "a finite number (λ)")


def check(params: TaskArithmeticParams, models: list[TaskModelParams]) -> None:
    if params.normalize:
        require_nonzero_sum([m.weight for m in models])


@register_merge("task_arithmetic", TaskArithmeticParams, TaskModelParams, base="required", check=check,
                self_merge={},
                description="θ0 + λ Σ w_i (θ_i − θ0)  (Ilharco et al. 2023)")
def merge(inputs: MergeInputs) -> Tensor:
    return merge_task_vectors(inputs.base, inputs.tensors, [m.weight for m in inputs.model_params],
                              normalize=inputs.params.normalize, scaling=inputs.params.scaling,
                              inplace=inputs.owned)

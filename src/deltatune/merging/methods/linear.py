"""Linear merge / model soup (Wortsman et al., "Model soups", ICML 2022): θ = Σ_i w_i θ_i / Σ_i w_i.

No base model is used (a `base_model` in the YAML only supplies config.json and tokenizer files unless it is
also listed under `models`). With `normalize: false` the weights must sum to 1 (an affine combination);
mergekit accepts any weights there, which silently rescales the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.params import check_field_types, require_nonzero_sum, require_unit_sum
from deltatune.merging.registry import MergeInputs, register_merge


@dataclass(frozen=True)
class LinearModelParams:
    """weight: the model's coefficient (default 1.0: a uniform soup)."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(self.weight == self.weight, "weight", self.weight, "a finite number")


@dataclass(frozen=True)
class LinearParams:
    """normalize: divide by Σ w_i (mergekit's default true)."""

    normalize: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)


def linear_merge(tensors: list[Tensor], weights: list[float], normalize: bool = True) -> Tensor:
    """Σ w_i θ_i (/ Σ w_i), accumulated in float32 (float64 for float64 inputs) like mergekit, in the inputs' dtype."""
    first = tensors[0]
    wide = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor(weights, dtype=wide, device=first.device)
    total = torch.zeros_like(first, dtype=wide)
    for tensor, coefficient in zip(tensors, weight):
        total.addcmul_(tensor, coefficient)
    if normalize:
        total.div_(weight.sum())
    return total.to(first.dtype)


def check(params: LinearParams, models: list[LinearModelParams]) -> None:
    weights = [m.weight for m in models]
    require_nonzero_sum(weights) if params.normalize else require_unit_sum(weights)


@register_merge("linear", LinearParams, LinearModelParams, base="unused", check=check, self_merge={},
                description="weighted average of the models (model soup)  (Wortsman et al. 2022)")
def merge(inputs: MergeInputs) -> Tensor:
    return linear_merge(inputs.tensors, [m.weight for m in inputs.model_params], inputs.params.normalize)

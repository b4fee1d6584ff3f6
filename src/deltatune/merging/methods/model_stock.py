"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024), per tensor
as mergekit 0.1.5 computes it.

With offsets δ_i = θ_i − θ_0 of the N >= 2 fine-tunes from the base, cos θ is the mean over model pairs of the
cosine between δ_i and δ_j (norm product clamped at 1e-6, cosine clamped to [−1, 1]); the interpolation ratio
is the paper's t = N cos θ / (1 + (N − 1) cos θ), and θ = t · mean_i θ_i + (1 − t) θ_0.
`filter_wise: true` takes one angle (and one t) per output row instead of one per tensor (1-D tensors count as
a single row), as mergekit's option of that name. The paper's two-model case is N = 2. Where the ratio is
undefined (|1 + (N − 1) cos θ| < 1e-6) the base is kept, as mergekit 0.1.5 does. Arithmetic: the working
dtype, mergekit's operations in its order (bit-identical with mergekit in float32, bfloat16 and float16, checked
against real mergekit-yaml output in test_mergekit_parity.py). float16 is computed in float16 like mergekit as
long as every norm product and dot product is finite; where one overflows (above 65,504, e.g. the offsets of a
large embedding) mergekit's cosine is 0 or NaN, and here that tensor is recomputed in float32 instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import MergeError
from deltatune.merging.params import check_field_types
from deltatune.merging.registry import MergeInputs, register_merge

NORM_PRODUCT_FLOOR = 1e-6
SINGULAR = 1e-6  # |1 + (k − 1) cos θ| below this: the ratio is undefined, keep the base (mergekit 0.1.5)


@dataclass(frozen=True)
class ModelStockParams:
    """filter_wise: one ratio per row (output filter) instead of one per tensor (mergekit's default false)."""

    filter_wise: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)


@dataclass(frozen=True)
class ModelStockModelParams:
    """Model Stock has no per-model parameters: the ratio comes from the angle between the fine-tunes."""

    def __post_init__(self) -> None:
        check_field_types(self)


def _rows(tensor: Tensor, filter_wise: bool) -> Tensor:
    if not filter_wise:
        return tensor.reshape(-1)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def mean_pairwise_cosine(offsets: list[Tensor]) -> tuple[Tensor, bool]:
    """Mean over pairs i < j of cos(δ_i, δ_j) along the last dimension (mergekit's clamps), and whether every
    norm product and dot product was finite (False: the working dtype overflowed, the cosine is wrong)."""
    cosines, finite = [], True
    for i, first in enumerate(offsets):
        for second in offsets[i + 1:]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(second, dim=-1)
            dots = (first * second).sum(dim=-1)
            finite = finite and bool(torch.isfinite(norms).all()) and bool(torch.isfinite(dots).all())
            cosines.append((dots / norms.clamp(min=NORM_PRODUCT_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0), finite


def model_stock_ratio(cos_theta: Tensor, count: int) -> Tensor:
    """The paper's t = k cos θ / (1 + (k − 1) cos θ) for k fine-tuned models.

    At the pole cos θ = −1/(k − 1) (e.g. two exactly opposite offsets) the ratio is undefined; where
    |1 + (k − 1) cos θ| < 1e-6, t = 0 (keep the base), as mergekit 0.1.5 does."""
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < SINGULAR
    ratio = count * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(ratio), ratio)


def model_stock_merge(base: Tensor, tensors: list[Tensor], filter_wise: bool = False) -> Tensor:
    """θ = t · mean θ_i + (1 − t) θ_0 with the angle-derived t, computed in the working dtype as mergekit
    (float16 in float32 only where a float16 norm or dot product overflows, see the module docstring)."""
    merged = _merge_in(base.dtype, base, tensors, filter_wise)
    if merged is None:
        merged = _merge_in(torch.float32, base, tensors, filter_wise)
    return merged


def _merge_in(dtype: torch.dtype, base: Tensor, tensors: list[Tensor], filter_wise: bool) -> Tensor | None:
    """The merge computed in `dtype`, rounded to the base's dtype; None when a float16 product overflowed."""
    anchor = _rows(base.to(dtype), filter_wise)
    tuned = [_rows(t.to(dtype), filter_wise) for t in tensors]
    cos_theta, finite = mean_pairwise_cosine([t - anchor for t in tuned])
    if not finite and dtype == torch.float16:
        return None
    ratio = model_stock_ratio(cos_theta, len(tuned)).unsqueeze(-1)
    average = sum(tuned) / len(tuned)
    return (ratio * average + (1 - ratio) * anchor).reshape(base.shape).to(base.dtype)


def check(params: ModelStockParams, models: list[ModelStockModelParams]) -> None:
    if len(models) < 2:
        raise MergeError(f"model_stock needs at least two fine-tuned models besides base_model (got {len(models)}):"
                         " the ratio comes from the angle between them; list two or more under `models`")


@register_merge("model_stock", ModelStockParams, ModelStockModelParams, base="required", check=check,
                min_models=2, self_merge={},
                description="interpolate base→average by the fine-tunes' angle  (Jang et al. 2024)")
def merge(inputs: MergeInputs) -> Tensor:
    check(inputs.params, list(inputs.model_params))
    return model_stock_merge(inputs.base, inputs.tensors, inputs.params.filter_wise)

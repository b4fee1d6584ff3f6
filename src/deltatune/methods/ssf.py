"""SSF: Scaling & Shifting your Features (Lian, Zhou, Feng, Wang, NeurIPS 2022, arXiv:2210.08823).

    y = γ ⊙ (W x + b) + β          γ, β ∈ R^out, one pair per adapted op, on the channel dimension

The first OUTPUT-kind method: the pair transforms what the frozen layer computed (the last dimension of token
features, dimension 1 of convolution maps). Because the transform is affine it folds into the layer it follows
(the paper's re-parameterization, §3.3): W' = diag(γ) W, b' = γ ⊙ b + β, so merged inference costs exactly what
the base model costs.

Initialization follows the official code (`init_ssf_scale_shift`): γ ~ N(1, σ²), β ~ N(0, σ²), σ = 0.02, so the
adapted model is close to, not equal to, the base model at step 0 (drawn from torch's global generator, like every
other method's init: seed it, or let `deltatune train --seed` do so).

Saved tensors per adapted module: ``ssf_scale`` (out,), ``ssf_shift`` (out,).

After a normalization layer (the paper inserts SSF after every op of a ViT block, LayerNorms included) the pair
folds into the norm's affine parameters: LayerNorm (elementwise_affine) computes n(x) ⊙ w + b, so γ ⊙ (n ⊙ w + b)
+ β is the same norm with w' = γ ⊙ w, b' = γ ⊙ b + β; BatchNorm (affine) likewise per channel, its running
statistics untouched. γ acts on the last dimension of a LayerNorm's output (the last entry of normalized_shape)
and on dimension 1 of a BatchNorm's.

Targets: by default (None) every Linear, transformers Conv1D, Conv, LayerNorm and BatchNorm except the output
head — the paper's "after every op"; `layer_types=("linear", "conv1d_hf", "conv")` restricts it to the weight
layers (the default before norms were offered), `layer_types=("layer_norm", "batch_norm")` to the norms.

Limits:
- A layer without a bias (or a LayerNorm with bias=False) can be adapted, but merging it is refused while its
  shift β is non-zero (there is no bias to fold β into); a norm without affine parameters (LayerNorm
  elementwise_affine=False, BatchNorm affine=False) can be adapted, but merging is refused unless its pair is
  exactly the identity (γ = 1, β = 0). Unmerge is refused where a scale is exactly 0 (the fold cannot be
  inverted).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import BATCH_NORM, CONV, CONV1D_HF, LAYER_NORM, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import NotMergeableError, config_check


@dataclass(frozen=True)
class SSFConfig(DeltaConfig):
    """SSF's one hyper-parameter besides targeting.

    Args:
        targets: by default (None) every Linear, transformers Conv1D, Conv, LayerNorm and BatchNorm except the
            output head (narrow it with `layer_types`).
        init_std: σ of the initialization γ ~ N(1, σ²), β ~ N(0, σ²); the official code's 0.02. 0 starts at
            the identity (the base model exactly).
    """

    targets: str | tuple[str, ...] | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.init_std >= 0, "init_std", self.init_std, "a standard deviation >= 0 (paper: 0.02)")


@register_method("ssf", SSFConfig, "SSF: a per-channel scale and shift after each adapted layer, folded on merge")
class SSFDelta(Delta):
    """SSF: a per-channel scale and shift after each adapted layer, folded on merge."""

    kind = DeltaKind.OUTPUT
    layer_kinds = frozenset({LINEAR, CONV1D_HF, CONV, LAYER_NORM, BATCH_NORM})
    preserves_output_at_init = False  # γ ~ N(1, σ²), β ~ N(0, σ²): near, not at, the identity

    def __init__(self, config: SSFConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        self.ssf_scale = nn.Parameter(torch.empty(layer.out_features))
        self.ssf_shift = nn.Parameter(torch.empty(layer.out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.ssf_scale, mean=1.0, std=self.config.init_std)
        nn.init.normal_(self.ssf_shift, mean=0.0, std=self.config.init_std)

    def _per_channel(self, vector: Tensor, like: Tensor) -> Tensor:
        """(out,) shaped to broadcast over `like`'s channel dimension: dim 1 of conv maps, the last otherwise."""
        vector = vector.to(like.dtype)
        if self.layer.kind == CONV:
            return vector.view(-1, *([1] * self.layer.conv_dims))
        if self.layer.kind == BATCH_NORM:  # (N, C) or (N, C, *spatial): channels on dimension 1
            return vector.view(-1, *([1] * (like.dim() - 2)))
        return vector

    def transform_output(self, y: Tensor) -> Tensor:
        return y * self._per_channel(self.ssf_scale, y) + self._per_channel(self.ssf_shift, y)

    # --- the folded form (§3.3): W' = diag(γ) W, b' = γ ⊙ b + β ---------------------------------------------
    def merge_into(self, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if weight is None:  # a norm without affine parameters: only the identity pair has somewhere to go
            self._refuse_unless_identity()
            return weight, bias
        return super().merge_into(weight, bias)

    def _refuse_unless_identity(self) -> None:
        if self.ssf_scale.detach().ne(1).any() or self.ssf_shift.detach().ne(0).any():
            raise NotMergeableError(
                f"ssf on {self.module_name or 'this layer'} follows a {self.layer.type_name} without affine "
                "parameters, so its scale and shift have no weight or bias to fold into; keep the adapter unmerged "
                "(or build the norm with elementwise_affine=True / affine=True)"
            )

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        gain = self.ssf_scale.to(base_weight.dtype) - 1
        return self.layer.from_matrix(gain[:, None] * self.layer.to_matrix(base_weight))

    def delta_bias(self, base_bias: Tensor | None) -> Tensor | None:
        if base_bias is None:
            return self.ssf_shift if self.ssf_shift.detach().any() else None
        return (self.ssf_scale.to(base_bias.dtype) - 1) * base_bias + self.ssf_shift.to(base_bias.dtype)

    def unmerge_from(self, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """W = diag(1/γ) W', b = (b' − β) / γ: the exact inverse of the fold (ΔW depends on W, so the default
        subtraction would not be)."""
        self._require_mergeable()
        if weight is None:  # merged only as the identity pair (see merge_into): nothing to undo
            return weight, bias
        gain = self.ssf_scale.detach().to(weight.dtype)
        if not gain.all():
            raise NotMergeableError(
                f"ssf on {self.module_name or 'this layer'} has a scale of exactly 0, so its fold cannot be undone; "
                "unload the adapter with merge=True instead of unmerging it"
            )
        base_weight = self.layer.from_matrix(self.layer.to_matrix(weight) / gain[:, None])
        if bias is None:
            return base_weight, None
        return base_weight, (bias - self.ssf_shift.detach().to(bias.dtype)) / gain

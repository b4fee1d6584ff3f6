"""BitFit: train only the bias terms (Ben Zaken, Ravfogel, Goldberg, ACL 2022, arXiv:2106.10199).

    y = W x + (b + Δb)          Δb ∈ R^out starts at 0, so the model equals the base model at step 0.

The plain selective baseline: the trainable set is fixed by structure (every adapted layer's bias), no scores.
The update is a constant added to the layer's output (the activation path), and merging writes b + Δb into the
layer's bias exactly.

Saved tensor per adapted module: ``bias_delta`` (out,).

Deviations: the paper also tunes LayerNorm biases; deltatune adapts Linear / Conv1D / Conv layers only (add the
norm modules to `extra_trainable` to train them whole). A layer without a bias is refused with a clear error
(BitFit changes existing biases, it does not add new ones). `delta_weight` is zero: the change lives in the bias,
`delta_bias` = Δb, which merging (b + Δb) and `combine_adapters` read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import CONV, CONV1D_HF, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import UnsupportedLayerError


@dataclass(frozen=True)
class BitFitConfig(DeltaConfig):
    """BitFit has no hyper-parameters besides targeting.

    Args:
        targets: by default (None) every Linear, transformers Conv1D and Conv layer except the output head; each
            must have a bias.
    """

    targets: str | tuple[str, ...] | None = None


@register_method("bitfit", BitFitConfig, "BitFit: train only the biases (the plain selective baseline)")
class BitFitDelta(Delta):
    """BitFit: train only the biases."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = frozenset({LINEAR, CONV1D_HF, CONV})

    def __init__(self, config: BitFitConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        self.bias_delta = nn.Parameter(torch.zeros(layer.out_features))

    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        if base_bias is None:
            raise UnsupportedLayerError(
                f"bitfit cannot adapt {self.module_name or self.layer.type_name!r}: it has no bias to tune; "
                "exclude it from `targets`"
            )

    def _broadcastable(self) -> Tensor:
        if self.layer.kind == CONV:  # (out, 1, ..., 1) against (batch, out, *spatial)
            return self.bias_delta.view(-1, *([1] * self.layer.conv_dims))
        return self.bias_delta

    def forward(self, x: Tensor) -> Tensor:
        return self._broadcastable().to(x.dtype)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return torch.zeros_like(base_weight)

    def delta_bias(self, base_bias: Tensor | None) -> Tensor:
        return self.bias_delta

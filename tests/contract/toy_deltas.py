"""Test-only toy deltas of the kinds no built-in method has yet: a multiplicative WEIGHT delta whose ΔW depends on
W, a mergeable affine OUTPUT delta (SSF-like, re-parameterized into W and b), and a non-mergeable OUTPUT delta.

They are not in the package registry: the `toy_methods` fixture registers them for one test and removes them.
Linear layers only (the math is written on the (out, in) weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import LayerInfo
from deltatune.core.registry import register_method, unregister_method


@dataclass(frozen=True)
class ToyWeightScaleConfig(DeltaConfig):
    pass


class ToyWeightScaleDelta(Delta):
    """W' = W ⊙ (1 + F): the layer runs with a transformed weight; unmerge divides (ΔW = W ⊙ F depends on W)."""

    kind = DeltaKind.WEIGHT

    def __init__(self, config: DeltaConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        self.factor = nn.Parameter(torch.zeros(layer.out_features, layer.in_features))

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return base_weight * self.factor.to(base_weight.dtype)

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight / (1 + self.factor.detach().to(weight.dtype)), bias


@dataclass(frozen=True)
class ToyAffineOutputConfig(DeltaConfig):
    pass


class ToyAffineOutputDelta(Delta):
    """y ↦ y ⊙ s + t per output channel (SSF's form). Merged by re-parameterization: W' = diag(s) W,
    b' = s ⊙ b + t; a layer without a bias can take it only while t = 0."""

    kind = DeltaKind.OUTPUT

    def __init__(self, config: DeltaConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        self.gain = nn.Parameter(torch.ones(layer.out_features))
        self.shift = nn.Parameter(torch.zeros(layer.out_features))

    def transform_output(self, y: Tensor) -> Tensor:
        return y * self.gain.to(y.dtype) + self.shift.to(y.dtype)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return (self.gain.to(base_weight.dtype) - 1)[:, None] * base_weight

    def delta_bias(self, base_bias: Tensor | None) -> Tensor | None:
        shift = self.shift.detach()
        if base_bias is None:  # no bias to fold the shift into: fine while the shift is zero
            return None if not shift.any() else shift
        return (self.gain.detach() - 1) * base_bias + shift

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        gain = self.gain.detach().to(weight.dtype)
        unshifted = None if bias is None else (bias - self.shift.detach().to(bias.dtype)) / gain
        return weight / gain[:, None], unshifted


@dataclass(frozen=True)
class ToyTanhGateConfig(DeltaConfig):
    pass


class ToyTanhGateDelta(Delta):
    """y ↦ y + g ⊙ tanh(y): not affine in y, so no (W', b') computes it."""

    kind = DeltaKind.OUTPUT
    mergeable = False

    def __init__(self, config: DeltaConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        self.gate = nn.Parameter(torch.zeros(layer.out_features))

    def transform_output(self, y: Tensor) -> Tensor:
        return y + self.gate.to(y.dtype) * torch.tanh(y)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        self._require_mergeable()
        raise AssertionError("unreachable")


TOYS = {
    "toy_weight_scale": (ToyWeightScaleConfig, ToyWeightScaleDelta),
    "toy_affine_output": (ToyAffineOutputConfig, ToyAffineOutputDelta),
    "toy_tanh_gate": (ToyTanhGateConfig, ToyTanhGateDelta),
}


@pytest.fixture
def toy_methods():
    """Register the toys for one test (so the public API builds and saves them) and remove them afterwards."""
    for name, (config_cls, delta_cls) in TOYS.items():
        register_method(name, config_cls, f"test-only toy: {delta_cls.__doc__.splitlines()[0]}")(delta_cls)
    yield TOYS
    for name in TOYS:
        unregister_method(name)

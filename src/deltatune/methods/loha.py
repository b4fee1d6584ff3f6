"""LoHa: low-rank Hadamard product update (FedPara, Hyeon-Woo et al., ICLR 2022; LyCORIS; peft's LoHaConfig).

    ΔW = (alpha / r) · (B₁ A₁) ⊙ (B₂ A₂)          B_i ∈ R^{out×r}, A_i ∈ R^{r×fan_in}

on the (out, fan_in) matrix view of the weight (a convolution's fan_in = in/groups · kernel). With
`effective_conv2d` (LyCORIS's Tucker form, peft's `use_effective_conv2d`) a convolution with a kernel larger than 1
builds each factor as a Tucker product over the kernel instead:

    W_i[p, q, k, l] = Σ_ab T_i[a, b, k, l] · B_i[a, p] · A_i[b, q]     T_i ∈ R^{r×r×k1×k2}, B_i (r, out), A_i (r, in)
    ΔW = (alpha / r) · W₁ ⊙ W₂

Initialization as peft: B₁, A₁, B₂, T₁, T₂ Kaiming-uniform, A₂ = 0, so ΔW = 0 at step 0 (`init="random"`: A₂
random too). The layer runs as peft runs it: base(x) + op(x, ΔW), op the layer's own (linear or convolution
with its stride, padding, dilation, groups). A Hadamard product has no cheaper activation path, so ΔW is formed
in forward (as in peft and LyCORIS).

Training-time regularizers, as peft: `rank_dropout` zeroes whole output rows of ΔW with that probability and
rescales by the kept share; `module_dropout` skips the whole update for a step with that probability. Both draw
from torch's global generator and act only in train mode.

Saved tensors (peft's and LyCORIS's names, so peft folders convert without renaming): ``hada_w1_a`` (out, r),
``hada_w1_b`` (r, fan_in), ``hada_w2_a``, ``hada_w2_b`` alike; with the Tucker form ``hada_t1``, ``hada_t2``
(r, r, k1, k2 — (r, r, k, 1) for Conv1d) and ``hada_w*_a`` (r, out), ``hada_w*_b`` (r, in/groups).

Deviations: peft multiplies by its scale as a float32 tensor (`torch.tensor(alpha / r)`), deltatune by the exact
alpha / r (the two agree exactly when alpha / r is a float32 number, e.g. the default 1); gradients come from
autograd (peft's hand-written backward gives the same values with less memory); module dropout draws a number only
when it is > 0 (peft draws one every training step). Conv3d, transformers Conv1D and embeddings are refused, as
peft does.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.layers import LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import config_check
from deltatune.functional.lycoris import hadamard_of_products, tucker_rebuild
from deltatune.methods.lycoris import (
    LycorisDelta,
    check_lycoris_fields,
    check_peft_config,
    common_config_fields,
    common_peft_fields,
)

LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
INITS = ("peft", "random")


@dataclass(frozen=True)
class LoHaConfig(DeltaConfig):
    """LoHa hyper-parameters (peft's defaults).

    Args:
        rank: r of each of the two factor pairs (ΔW can reach rank r²).
        alpha: the scale numerator: ΔW = (alpha / r) (B₁A₁) ⊙ (B₂A₂).
        rank_dropout: probability of dropping an output row of ΔW in training, in [0, 1).
        module_dropout: probability of skipping the update for a training step, in [0, 1).
        effective_conv2d: the Tucker form for convolutions with kernels larger than 1 (peft's use_effective_conv2d).
        init: "peft" (A₂ = 0: the base output at step 0) or "random" (every factor random).
    """

    budget_field: ClassVar[str | None] = "rank"
    peft_type: ClassVar[str] = "LOHA"

    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    effective_conv2d: bool = False
    init: str = "peft"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lycoris_fields(self)
        config_check(self.init in INITS, "init", self.init, f"one of {INITS}")

    def to_peft_config(self, target_paths: list[str], extra_paths: list[str]) -> dict[str, Any]:
        return {"peft_type": "LOHA", **common_peft_fields(self, target_paths, extra_paths)}

    @classmethod
    def from_peft_config(cls, peft: dict[str, Any], tensor_keys: Iterable[str]) -> LoHaConfig:
        """The LoHaConfig of a peft LoHa folder; every field honoured or refused by name (`methods.lycoris`)."""
        check_peft_config(peft, "LOHA")
        return cls(**common_config_fields(peft, tensor_keys, LOHA_TENSORS, "LoHa"))


@register_method("loha", LoHaConfig, "LoHa: (alpha/r)·(B₁A₁) ⊙ (B₂A₂), LyCORIS/peft's Hadamard product update")
class LoHaDelta(LycorisDelta):
    """LoHa: (alpha/r)·(B₁A₁) ⊙ (B₂A₂), LyCORIS/peft's Hadamard product update."""

    def __init__(self, config: LoHaConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        r = config.rank
        if self.uses_tucker:
            kernel = tuple(layer.kernel_size) + (1,) * (2 - layer.conv_dims)
            for pair in ("1", "2"):
                setattr(self, f"hada_t{pair}", nn.Parameter(torch.empty(r, r, *kernel)))
                setattr(self, f"hada_w{pair}_a", nn.Parameter(torch.empty(r, layer.out_features)))
                setattr(self, f"hada_w{pair}_b", nn.Parameter(torch.empty(r, layer.weight_shape[1])))
        else:
            for pair in ("1", "2"):
                setattr(self, f"hada_w{pair}_a", nn.Parameter(torch.empty(layer.out_features, r)))
                setattr(self, f"hada_w{pair}_b", nn.Parameter(torch.empty(r, layer.fan_in)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, parameter in self.named_parameters(recurse=False):
            if name == "hada_w2_b" and self.config.init == "peft":
                nn.init.zeros_(parameter)
            else:
                nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))

    def update(self) -> Tensor:
        if self.uses_tucker:
            first = tucker_rebuild(self.hada_t1, self.hada_w1_a, self.hada_w1_b, in_factor_first=True)
            weight = first * tucker_rebuild(self.hada_t2, self.hada_w2_a, self.hada_w2_b, in_factor_first=True)
        else:
            weight = hadamard_of_products((self.hada_w1_a, self.hada_w1_b), (self.hada_w2_a, self.hada_w2_b))
        return (weight * self.scale).reshape(self.layer.weight_shape)

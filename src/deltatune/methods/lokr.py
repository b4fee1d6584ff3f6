"""LoKr: low-rank Kronecker product update (LyCORIS, Yeh et al., ICLR 2024 "Navigating Text-To-Image Customization";
peft's LoKrConfig).

    ΔW = (alpha / r) · W₁ ⊗ W₂        W₁ ∈ R^{a×c}, W₂ ∈ R^{b×d(×k1×k2)},  out = a·b,  in/groups = c·d

with (a, b) = factorization(out, decompose_factor) and (c, d) = factorization(in/groups, decompose_factor)
(`functional.lycoris.factorization`: a <= b, c <= d, near √ by default). Each factor is full or low rank by
LyCORIS's rule, which peft follows:

- W₁ is full (``lokr_w1``) unless `decompose_both` and r < max(a, c)/2; then W₁ = ``lokr_w1_a`` ``lokr_w1_b``
  ((a, r)(r, c));
- W₂ is full (``lokr_w2``, (b, d) or (b, d, *kernel)) unless r < max(b, d)/2; then W₂ = ``lokr_w2_a``
  ``lokr_w2_b`` ((b, r)(r, d·kernel)), or with `effective_conv2d` on a convolution whose kernel is larger than
  1, the Tucker form W₂[p, q, k, l] = Σ ``lokr_t2``[i, j, k, l] ``lokr_w2_a``[i, p] ``lokr_w2_b``[j, q]
  (t2 (r, r, k1, k2) — (r, r, k, 1) for Conv1d; w2_a (r, b); w2_b (r, d)).

The Kronecker product is reshaped to the weight's native shape exactly as peft does. The layer runs as peft runs
it: base(x) + op(x, ΔW) with the layer's own op (ΔW is formed in forward, as in peft and LyCORIS).

Initialization (`init`): "peft" (peft's default: W₁ = 0 — ``lokr_w1`` or ``lokr_w1_a`` — the rest
Kaiming-uniform, so ΔW = 0 at step 0), "lycoris" (peft's init_weights="lycoris": W₂'s ``lokr_w2`` or
``lokr_w2_b`` = 0 instead) or "random". Training-time regularizers as peft: `rank_dropout` zeroes output rows of
ΔW (rescaled by the kept share only with `rank_dropout_scale`), `module_dropout` skips the update for a step.

Deviations: peft 0.21.2 crashes on the Tucker form of a Conv1d (torch.kron cannot view the rebuilt block);
deltatune computes it by the same formula. Gradients come from autograd; module dropout draws a number only when
it is > 0 (peft draws one every training step). Conv3d, transformers Conv1D and embeddings are refused, as peft
does.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.layers import CONV, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import config_check
from deltatune.functional.lycoris import factorization, kronecker, tucker_rebuild
from deltatune.methods.lycoris import (
    LycorisDelta,
    check_lycoris_fields,
    check_peft_config,
    common_config_fields,
    common_peft_fields,
)

LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
INITS = ("peft", "lycoris", "random")


@dataclass(frozen=True)
class LoKrConfig(DeltaConfig):
    """LoKr hyper-parameters (peft's defaults).

    Args:
        rank: r of the low-rank factors (used only where the rule above decomposes a factor).
        alpha: the scale numerator: ΔW = (alpha / r) W₁ ⊗ W₂.
        rank_dropout: probability of dropping an output row of ΔW in training, in [0, 1).
        module_dropout: probability of skipping the update for a training step, in [0, 1).
        effective_conv2d: the Tucker form of W₂ for convolutions with kernels larger than 1.
        decompose_both: also decompose W₁ when r < max(a, c)/2.
        decompose_factor: the preferred size of the first factor of each dimension (-1: near the square root).
        rank_dropout_scale: rescale rows kept by rank dropout by the kept share.
        init: "peft", "lycoris" or "random" (see the module doc).
    """

    # No budget knob: rank sizes a factor only below max(b, d)/2 (then the count saturates), so it cannot be
    # searched monotonically; LoKr is compared at its natural budget.
    budget_field: ClassVar[str | None] = None
    peft_type: ClassVar[str] = "LOKR"

    rank: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init: str = "peft"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lycoris_fields(self)
        config_check(self.decompose_factor == -1 or self.decompose_factor > 0, "decompose_factor",
                     self.decompose_factor, "-1 (near the square root) or an integer > 0")
        config_check(self.init in INITS, "init", self.init, f"one of {INITS}")

    def to_peft_config(self, target_paths: list[str], extra_paths: list[str]) -> dict[str, Any]:
        return {"peft_type": "LOKR", **common_peft_fields(self, target_paths, extra_paths),
                "decompose_both": self.decompose_both, "decompose_factor": self.decompose_factor,
                "rank_dropout_scale": self.rank_dropout_scale}

    @classmethod
    def from_peft_config(cls, peft: dict[str, Any], tensor_keys: Iterable[str]) -> LoKrConfig:
        """The LoKrConfig of a peft LoKr folder; every field honoured or refused by name (`methods.lycoris`)."""
        check_peft_config(peft, "LOKR")
        return cls(**common_config_fields(peft, tensor_keys, LOKR_TENSORS, "LoKr"),
                   decompose_both=peft.get("decompose_both", False), decompose_factor=peft.get("decompose_factor", -1),
                   rank_dropout_scale=peft.get("rank_dropout_scale", False))


@register_method("lokr", LoKrConfig, "LoKr: (alpha/r)·W₁ ⊗ W₂ with low-rank factors, LyCORIS/peft's Kronecker update")
class LoKrDelta(LycorisDelta):
    """LoKr: (alpha/r)·W₁ ⊗ W₂ with low-rank factors, LyCORIS/peft's Kronecker update."""

    def __init__(self, config: LoKrConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        r = config.rank
        (a, b), (c, d) = factorization(layer.out_features, config.decompose_factor), \
            factorization(layer.weight_shape[1], config.decompose_factor)
        self.first_form = "lowrank" if config.decompose_both and r < max(a, c) / 2 else "full"
        self.second_form = "full" if r >= max(b, d) / 2 else "tucker" if self.uses_tucker else "lowrank"
        if self.first_form == "lowrank":
            self.lokr_w1_a, self.lokr_w1_b = nn.Parameter(torch.empty(a, r)), nn.Parameter(torch.empty(r, c))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        kernel = tuple(layer.kernel_size) if layer.kind == CONV else ()
        if self.second_form == "full":
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
        elif self.second_form == "tucker":
            self.lokr_t2 = nn.Parameter(torch.empty(r, r, *kernel, *(1,) * (2 - len(kernel))))
            self.lokr_w2_a, self.lokr_w2_b = nn.Parameter(torch.empty(r, b)), nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(kernel)))
        self.reset_parameters()

    def _rescales(self) -> bool:
        return self.config.rank_dropout_scale

    def reset_parameters(self) -> None:
        zero = {"peft": ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), "random": ()}[self.config.init]
        for name, parameter in self.named_parameters(recurse=False):
            if name in zero:
                nn.init.zeros_(parameter)
            else:
                nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))

    def update(self) -> Tensor:
        first = self.lokr_w1 if self.first_form == "full" else self.lokr_w1_a @ self.lokr_w1_b
        if self.second_form == "full":
            second = self.lokr_w2
        elif self.second_form == "tucker":
            second = tucker_rebuild(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            second = self.lokr_w2_a @ self.lokr_w2_b
        return (kronecker(first, second) * self.scale).reshape(self.layer.weight_shape)

"""FLoRA: a low-rank Tucker core for N-D weights (Si et al., "Maintaining Structural Integrity in Parameter Spaces
for Parameter Efficient Fine-tuning", ICLR 2025; arXiv:2405.14739, first titled "FLoRA: Low-Rank Core Space for
N-dimension"; official code SJTU-DeepVisionLab/FLoRA, `flora/layers.py`).

An N-D weight with mode sizes [I_1, ..., I_N], in the official order [in, out, k_1, ..., k_d], changes by

    ΔW = s · G ×_1 U_1 ×_2 U_2 ... ×_N U_N           G ∈ R^{r_1×...×r_N}, U_n ∈ R^{I_n×r_n}

(×_n the mode-n product: mode n of the core, of size r_n, becomes I_n through U_n), then the first two modes are
swapped into the layer's [out, in, k...] layout. A Linear is the 2-D case (ΔW = s · U_out Gᵀ U_inᵀ); a Conv1d /
Conv2d / Conv3d keeps its kernel as 1 / 2 / 3 modes of their own (N = 3, 4, 5), so the update keeps the
convolution's topology instead of flattening the kernel into a matrix as LoRA does. Trainable numbers per layer:
Π r_n + Σ I_n r_n.

Grouped and depthwise convolutions: the in mode is the weight's own, in/groups (the weight is
out × in/groups × k...), so the update has the weight's shape and runs with the layer's groups. The official code
sizes it with the full in_channels, which gives a tensor F.conv2d refuses for groups > 1 (ConvNeXt's depthwise
7×7); deltatune does not reproduce that bug.

Initialization (official `FLoRALayer.init_parameters`): G = 0 and every U_n Kaiming-normal with a = √3 over its
(I_n, r_n) shape (std = 1 / √(2 r_n)), so ΔW = 0 and the adapted model equals the base model at step 0; G's
gradient is non-zero from the first step, the factors' from the second. ``init="random"`` draws G too (tests).

Ranks per mode (the defaults and why):
- ``rank`` = 8 for the two channel modes (in, out): the official layer's default r = [8, 8], also LoRA's default
  rank here, so the two methods start from the same knob (the official ConvNeXt example uses 16 on its much wider
  layers). It is the budget knob: budget matching varies it alone.
- ``kernel_rank`` = 2 for every kernel mode: the official example's only published convolution setting,
  r = [16, 16, 2, 2] on ConvNeXt.
- Each rank is capped at its mode's size (a 1-channel input gets in-rank 1, a 1×1 kernel kernel-rank 1): a rank
  above I_n only adds redundant core entries. The official code accepts any rank; this is a deviation.

Scale: ``scale`` = 4.0, the official example's (the only setting the authors publish for the vision layers; the
official layer's default 1.0 is a placeholder and the authors' NLP port uses alpha / r). It does not depend on the
rank, so changing the rank does not rescale the update.

Forward, on the activation path where one exists (never a dense ΔW): a Linear (and transformers Conv1D, the same
update on its transposed weight) runs x U_in G U_outᵀ; a convolution with groups = 1 runs three convolutions,
1×1 (in → r_in), the core convolution (r_in → r_out, the kernel G ×_k U_k with the layer's stride, padding and
dilation), 1×1 (r_out → out) — the Tucker-2 factorization of a convolution, equal to op(x, ΔW). A grouped
convolution runs op(x, ΔW) with ΔW formed (it has no such factorization across groups). Dropout (``dropout``, on
the update's input) is 0 by default; the official example sets 0.01.

Mergeable: ΔW does not depend on W, so merge adds it and unmerge subtracts it.
Layer kinds: nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d. Embeddings are refused: the official Embedding
class adds one shared vector to every token and fails its own shape check, so there is no paper form to follow.

Saved tensors per adapted module: ``flora_core`` (r_in, r_out, r_k1, ...) G in the official mode order, and
``flora_factor_<n>`` (I_n, r_n) U_n for n = 0 (in, in/groups for a convolution), 1 (out), 2... (kernel modes):
the official ``param_G`` / ``param_<n>`` under deltatune names.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import CONV, CONV1D_HF, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import config_check

INITS = ("paper", "random")
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class FLoRAConfig(DeltaConfig):
    """FLoRA hyper-parameters (defaults: the official code's; see the module docstring).

    Args:
        rank: the core's rank on the two channel modes (in, out), capped at each mode's size.
        kernel_rank: the core's rank on every kernel mode of a convolution, capped at the kernel's size.
        scale: s in ΔW = s · G ×_1 U_1 ... ×_N U_N (> 0).
        dropout: dropout on the update's input, in [0, 1).
        init: "paper" (G = 0: the base output at step 0) or "random" (G random too; for tests).
    """

    budget_field: ClassVar[str | None] = "rank"

    rank: int = 8
    kernel_rank: int = 2
    scale: float = 4.0
    dropout: float = 0.0
    init: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.rank > 0, "rank", self.rank, "an integer > 0")
        config_check(self.kernel_rank > 0, "kernel_rank", self.kernel_rank, "an integer > 0")
        config_check(self.scale > 0, "scale", self.scale, "a number > 0")
        config_check(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")
        config_check(self.init in INITS, "init", self.init, f"one of {INITS}")


def mode_sizes(layer: LayerInfo) -> tuple[int, ...]:
    """[I_in, I_out, k...] in the official order; a convolution's in mode is in/groups (its weight's dim 1)."""
    if layer.kind == CONV:
        return (layer.weight_shape[1], layer.out_features, *layer.kernel_size)
    return (layer.in_features, layer.out_features)


def mode_ranks(config: FLoRAConfig, sizes: Sequence[int]) -> tuple[int, ...]:
    """The core's shape: `rank` on the channel modes, `kernel_rank` on the kernel modes, each capped at its size."""
    wanted = (config.rank, config.rank, *([config.kernel_rank] * (len(sizes) - 2)))
    return tuple(min(r, size) for r, size in zip(wanted, sizes))


def mode_product(tensor: Tensor, factor: Tensor, mode: int) -> Tensor:
    """tensor ×_mode factor: mode `mode` (size r) of `tensor` becomes size I through `factor` (I × r)."""
    return torch.movedim(torch.tensordot(tensor, factor, dims=([mode], [1])), -1, mode)


def tucker_product(core: Tensor, factors: Sequence[Tensor], first_mode: int = 0) -> Tensor:
    """core ×_{first_mode} U_0 ×_{first_mode+1} U_1 ...: the factors applied to consecutive modes from `first_mode`."""
    result = core
    for offset, factor in enumerate(factors):
        result = mode_product(result, factor, first_mode + offset)
    return result


@register_method("flora", FLoRAConfig, "FLoRA: Tucker update s·G ×₁U₁ … ×_N U_N keeping a conv's kernel modes")
class FLoRADelta(Delta):
    """FLoRA: Tucker update s·G ×₁U₁ … ×_N U_N keeping a conv's kernel modes."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = frozenset({LINEAR, CONV1D_HF, CONV})

    def __init__(self, config: FLoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        sizes = mode_sizes(layer)
        ranks = mode_ranks(config, sizes)
        self.flora_core = nn.Parameter(torch.empty(ranks))
        for mode, (size, rank) in enumerate(zip(sizes, ranks)):
            setattr(self, f"flora_factor_{mode}", nn.Parameter(torch.empty(size, rank)))
        # float64 so that float64 models keep the exact scale; `adapt` casts it with the other tensors
        self.register_buffer("scale", torch.tensor(config.scale, dtype=torch.float64), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def factors(self) -> list[Tensor]:
        """U_0 (in), U_1 (out), U_2... (kernel modes)."""
        return [getattr(self, f"flora_factor_{mode}") for mode in range(self.flora_core.dim())]

    @property
    def rank(self) -> int:
        """`HasRank`: the channel-mode rank (the budget knob; capped per layer)."""
        return max(self.flora_core.shape[:2])

    def reset_parameters(self) -> None:
        for factor in self.factors:  # official: Kaiming-normal, a = √3, fan-in = r_n (torch's dim-1 convention)
            nn.init.kaiming_normal_(factor, a=math.sqrt(3))
        if self.config.init == "random":
            nn.init.normal_(self.flora_core)
        else:
            nn.init.zeros_(self.flora_core)

    def tucker(self) -> Tensor:
        """G ×_1 U_1 ... ×_N U_N in the official [in, out, k...] order, unscaled."""
        return tucker_product(self.flora_core, self.factors)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        swapped = self.tucker().transpose(0, 1) * self.scale  # [out, in, k...]: the layer's layout
        return self.layer.from_matrix(swapped.reshape(self.layer.out_features, -1)).to(base_weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x_in = self.dropout(x.to(self.flora_core.dtype))
        if self.layer.kind != CONV:
            out = self._dense_path(x_in) * self.scale
        elif self.layer.conv_args.get("groups", 1) == 1:
            out = self._conv_path(x_in) * self.scale
        else:  # no factorization across groups: the layer's own grouped op with ΔW (already scaled)
            out = self.layer.op(x_in, self.delta_weight(self.flora_core), None)
        return out.to(x.dtype)

    def _dense_path(self, x: Tensor) -> Tensor:
        """x U_in G U_outᵀ (unscaled)."""
        factor_in, factor_out = self.factors
        return F.linear(F.linear(F.linear(x, factor_in.T), self.flora_core.T), factor_out)

    def _conv_path(self, x: Tensor) -> Tensor:
        """1×1 (in → r_in), the core convolution (r_in → r_out, the layer's stride/padding/dilation), 1×1 (r_out →
        out): the same as the convolution with ΔW for groups = 1, without forming ΔW (unscaled)."""
        factor_in, factor_out, *kernel_factors = self.factors
        dims = self.layer.conv_dims
        conv = _CONVS[dims]
        kernel = tucker_product(self.flora_core, kernel_factors, first_mode=2).transpose(0, 1)  # (r_out, r_in, k...)
        args = {name: value for name, value in self.layer.conv_args.items() if name != "groups"}
        hidden = conv(x, factor_in.T.reshape(*factor_in.T.shape, *([1] * dims)))
        hidden = conv(hidden, kernel, **args)
        return conv(hidden, factor_out.reshape(*factor_out.shape, *([1] * dims)))

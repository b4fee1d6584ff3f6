"""Bottleneck adapters: sequential (Houlsby et al., ICML 2019, arXiv:1902.00751; Pfeiffer et al., EACL 2021,
arXiv:2005.00247) and parallel (He et al., ICLR 2022, arXiv:2110.04366).

    sequential ("bottleneck_adapter", an OUTPUT delta):  y' = y + s · up(f(down(y)))        y = base(x)
    parallel   ("parallel_adapter", an ADDITIVE delta):   y' = base(x) + s · up(f(down(x)))

down: d → r and up: r → d_out are Linear maps with biases, f a non-linearity, s a constant scaling. The bottleneck
r is `bottleneck_size`, or d_out // `reduction_factor` (at least 1): d_out is the width of the stream the adapter
writes into, the model's hidden size on the presets' layers, as the adapters library sizes it
(`hidden_size // reduction_factor`).

Placement is targeting, not a method branch: `targets="pfeiffer"` (one adapter per block, after the FFN's output
projection) and `targets="houlsby"` (two, after the attention output projection and after the FFN's output
projection) are presets, regular expressions over the module names of BERT/ViT (transformers'
`*.attention.output.dense`, `*.layer.<i>.output.dense`; newer ViT code: `attention.o_proj`, `mlp.fc2`), Llama
(`self_attn.o_proj`, `mlp.down_proj`), GPT-2 (`attn.c_proj`, `mlp.c_proj`), CLIP/timm style models
(`self_attn.out_proj` / `attn.proj`, `mlp.fc2`) and diffusers' transformer blocks (`attn1.to_out.0`, `ff.net.2`);
any other targets work as for every method. A model without an FFN (the glyph DDPM's UNet has attention blocks
only) has no Pfeiffer placement: name its layers. A preset resolves when the config is built, so a saved config
holds the expression.

Defaults follow the adapters library (adapter-hub/adapters, read for facts, no code taken):
- `seq_bn` (Pfeiffer): after the FFN, reduction factor 16, ReLU, init "bert", scaling 1;
- `double_seq_bn` (Houlsby): after attention and FFN, reduction factor 16, swish (SiLU), init "bert", scaling 1;
- `par_bn` (He et al.): after the FFN, in parallel, reduction factor 2, ReLU, init "mam_adapter", scaling 4.
With `non_linearity=None` (the default) a sequential adapter takes the preset's activation (houlsby: swish,
otherwise ReLU). Inits: "bert" — both weights N(0, 0.02²), biases 0 (near, not at, the identity); "houlsby" — both
weights truncated N(0, 0.01²) within ±0.02, biases 0; "mam_adapter" — down Kaiming-uniform (a = √5), up and both
biases 0 (exactly the identity). Dropout (default 0) acts on the scaled adapter output, as in the library.

Deviations (our reading of one-layer deltas): the library's Pfeiffer config (`original_ln_before=True`) feeds its
adapter the block's post-LayerNorm sum LN(h + x) and adds h back; ours reads the FFN projection's output h, as its
Houlsby config does. Its parallel adapter reads the FFN sub-block's input and adds to the sub-block's output; ours
spans the one adapted layer (on the presets, the FFN's output projection: it reads the FFN's hidden activation).
Dropout inside the base layer's module (BERT's hidden dropout) comes after the layer, so after our adapter.

Neither kind merges: f is non-linear, so no weight of the base layer computes the adapter (merge and
`unload(merge=True)` refuse with a NotMergeableError and leave every layer as it was; `unload(merge=False)` works).

Saved tensors per adapted module: ``adapter_down.weight`` (r, d_in), ``adapter_down.bias`` (r,),
``adapter_up.weight`` (d_out, r), ``adapter_up.bias`` (d_out,); d_in = d_out for the sequential kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import CONV, CONV1D_HF, EMBEDDING, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import NotMergeableError, config_check

_ATTENTION_OUTPUTS = (r"attention\.output\.dense|(self_attn|attention)\.o_proj|attn\.c_proj|self_attn\.out_proj"
                      r"|attn\.proj|attn\d?\.to_out\.0")
_FFN_OUTPUTS = r"layer\.\d+\.output\.dense|mlp\.down_proj|mlp\.c_proj|mlp\.fc2|ff\.net\.2"
PLACEMENTS = {
    "pfeiffer": rf"(.*\.)?({_FFN_OUTPUTS})",
    "houlsby": rf"(.*\.)?({_ATTENTION_OUTPUTS}|{_FFN_OUTPUTS})",
}
PRESET_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh,
               "leakyrelu": F.leaky_relu, "identity": lambda x: x}
INITS = ("bert", "houlsby", "mam_adapter")


def _preset_name(targets) -> str | None:
    """The placement preset `targets` names ("houlsby", ["houlsby"] from the command line), or None."""
    name = targets[0] if isinstance(targets, tuple) and len(targets) == 1 else targets
    return name if isinstance(name, str) and name in PLACEMENTS else None


@dataclass(frozen=True)
class BottleneckAdapterConfig(DeltaConfig):
    """A sequential bottleneck adapter after each targeted layer (library defaults: seq_bn / double_seq_bn).

    Args:
        targets: "pfeiffer" (default: after the FFN output), "houlsby" (also after the attention output), or
            any module names / regular expression.
        reduction_factor: r = d_out // reduction_factor (the library's 16), unless `bottleneck_size` is set.
        bottleneck_size: r itself (None: from reduction_factor). The budget knob.
        non_linearity: one of relu, gelu, swish, silu, tanh, leakyrelu, identity; None takes the preset's
            (houlsby: swish, otherwise relu).
        init: "bert" (library default), "houlsby" or "mam_adapter" (zero up-projection: exactly the identity).
        scaling: s, the constant the adapter's output is multiplied by (library: 1).
        dropout: on the scaled adapter output (library: 0).
    """

    budget_field: ClassVar[str | None] = "bottleneck_size"
    targets: str | tuple[str, ...] | None = "pfeiffer"
    reduction_factor: float = 16.0
    bottleneck_size: int | None = None
    non_linearity: str | None = None
    init: str = "bert"
    scaling: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        preset = _preset_name(self.targets)
        if preset is not None:
            object.__setattr__(self, "targets", PLACEMENTS[preset])
        if self.non_linearity is None:
            object.__setattr__(self, "non_linearity", PRESET_ACTIVATION.get(preset or "", "relu"))
        super().__post_init__()
        self._check_ranges()

    def _check_ranges(self) -> None:
        config_check(self.reduction_factor > 0, "reduction_factor", self.reduction_factor,
                     "a number > 0 (library: 16 sequential, 2 parallel)")
        if self.bottleneck_size is not None:
            config_check(self.bottleneck_size >= 1, "bottleneck_size", self.bottleneck_size,
                         "an integer >= 1, or None to size it from reduction_factor")
        config_check(self.non_linearity in ACTIVATIONS, "non_linearity", self.non_linearity,
                     f"one of {', '.join(ACTIVATIONS)}")
        config_check(self.init in INITS, "init", self.init, f"one of {', '.join(INITS)}")
        config_check(math.isfinite(self.scaling), "scaling", self.scaling, "a finite number (library: 1, parallel 4)")
        config_check(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")

    def bottleneck(self, out_features: int) -> int:
        """r for a layer writing `out_features` numbers per position."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, int(out_features // self.reduction_factor))


@dataclass(frozen=True)
class ParallelAdapterConfig(BottleneckAdapterConfig):
    """A parallel bottleneck adapter beside each targeted layer (library defaults: par_bn). Fields as
    `BottleneckAdapterConfig`; defaults: reduction factor 2, ReLU, init "mam_adapter", scaling 4."""

    reduction_factor: float = 2.0
    non_linearity: str | None = "relu"
    init: str = "mam_adapter"
    scaling: float = 4.0


class BottleneckModule(Delta):
    """down → f → up → · s → dropout, over the last dimension (r = `size`, else from the config); shared by
    both kinds and by IAA (methods/iaa.py)."""

    mergeable = False

    def __init__(self, config: BottleneckAdapterConfig, layer: LayerInfo, module_name: str, in_features: int,
                 size: int | None = None) -> None:
        super().__init__(config, layer, module_name)
        size = size or config.bottleneck(layer.out_features)
        self.adapter_down = nn.Linear(in_features, size)
        self.adapter_up = nn.Linear(size, layer.out_features)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init = self.config.init
        if init == "bert":
            for linear in (self.adapter_down, self.adapter_up):
                nn.init.normal_(linear.weight, mean=0.0, std=0.02)
        elif init == "houlsby":
            for linear in (self.adapter_down, self.adapter_up):
                nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        else:  # mam_adapter: LoRA-like, the up-projection starts at zero
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)

    def bottleneck_output(self, h: Tensor) -> Tensor:
        """s · up(f(down(h))) (dropped out in training), features on the last dimension."""
        activation = ACTIVATIONS[self.config.non_linearity]
        return self.dropout(self.adapter_up(activation(self.adapter_down(h))) * self.config.scaling)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        raise self._not_mergeable()

    def _require_mergeable(self) -> None:
        raise self._not_mergeable()

    def _not_mergeable(self) -> NotMergeableError:
        return NotMergeableError(
            f"{self.config.method or 'bottleneck adapter'} on {self.module_name or 'this layer'} is non-linear "
            f"({self.config.non_linearity} between its projections), so no weight of the layer computes it; keep it "
            "unmerged, or unload with merge=False"
        )


@register_method("bottleneck_adapter", BottleneckAdapterConfig,
                 "sequential bottleneck adapters (Houlsby: two per block, Pfeiffer: one after the FFN)")
class BottleneckAdapterDelta(BottleneckModule):
    """y + s · up(f(down(y))) after the layer (features on the last dimension; channels of conv maps)."""

    kind = DeltaKind.OUTPUT
    layer_kinds = frozenset({LINEAR, CONV1D_HF, CONV, EMBEDDING})
    preserves_output_at_init = False  # the library's default "bert" init: near, not at, the identity

    def __init__(self, config: BottleneckAdapterConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name, layer.out_features)

    def transform_output(self, y: Tensor) -> Tensor:
        if self.layer.kind == CONV:  # channels on dimension 1 of a map (or 0 of an unbatched one)
            channel = y.dim() - 1 - self.layer.conv_dims
            return y + self.bottleneck_output(y.movedim(channel, -1).contiguous()).movedim(-1, channel)
        return y + self.bottleneck_output(y)


@register_method("parallel_adapter", ParallelAdapterConfig,
                 "parallel bottleneck adapters (He et al.): base(x) + s · up(f(down(x)))")
class ParallelAdapterDelta(BottleneckModule):
    """s · up(f(down(x))) added to the layer's output."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = frozenset({LINEAR, CONV1D_HF})
    preserves_output_at_init = True  # mam_adapter init: the up-projection starts at zero

    def __init__(self, config: ParallelAdapterConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name, layer.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck_output(x.to(self.adapter_down.weight.dtype))

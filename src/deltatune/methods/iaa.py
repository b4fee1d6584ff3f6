"""IAA, "Inside and Aside": per-layer PEFT modules connected into one pathway (Ma, Guo, Zhang, Fan, Cheng,
"Scattered or Connected? An Optimized Parameter-efficient Tuning Approach for Information Retrieval", CIKM 2022,
arXiv:2208.09847).

What the paper says (abstract; our notes /work/shared/methods/other.md §7): PEFT modules placed separately in
each layer ("scattered", inside modules) learn slowly and unstably in dense retrieval; adding "aside" bottleneck
modules beside the pre-trained model that connect the inside modules, so that all trainable modules form one
pathway, makes training converge faster and reach full fine-tuning.

OUR READING — the paper's section on the wiring could not be read here (only its first page is reachable), so
shapes, placement and init below are ours, not the paper's:

    inside, in each block ℓ (a sequential bottleneck adapter on the FFN output projection, Pfeiffer's place):
        y' = y + s · up(f(down(y)))
    aside, spanning block ℓ (a parallel bottleneck adapter around the whole block):
        h_ℓ = Block_ℓ(h_{ℓ-1}) + s_a · up_a(f(down_a(h_{ℓ-1})))

Block ℓ's input h_{ℓ-1} carries inside module ℓ-1's output, and aside ℓ writes where block ℓ's output (and so
inside module ℓ's) lands: inside_ℓ → aside_{ℓ+1} → aside_{ℓ+2} → … → the model's output is a path through
trainable modules only (no frozen weight matrix on it; the blocks' LayerNorms are crossed at the inside modules),
the "pathway" the paper's gradient argument asks for. `connected=False` keeps only the inside modules: the
scattered baseline of the same family (size it with `bottleneck_size` to the connected count).

Both up-projections start at zero (the "mam_adapter" init of bottleneck adapters): the model is unchanged at
initialization. Not mergeable (f is non-linear). Saved tensors per hosted module: ``adapter_down.weight``,
``adapter_down.bias``, ``adapter_up.weight``, ``adapter_up.bias`` (inside modules on the projections, aside
modules on the blocks).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.core.delta import DeltaKind
from deltatune.core.layers import CONV1D_HF, LINEAR, MODULE, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, config_check
from deltatune.functional.prompts import block_token_input
from deltatune.methods.bottleneck_adapter import PLACEMENTS, BottleneckAdapterConfig, BottleneckModule


@dataclass(frozen=True)
class IAAConfig(BottleneckAdapterConfig):
    """Connected (inside + aside) bottleneck modules; our reading of IAA (see the module docstring).

    Args:
        targets: None (the default) derives them: the inside placement, plus the blocks when `connected`.
        inside: where the inside modules go: "pfeiffer" (after each FFN output projection), "houlsby" (also
            after the attention output projection), or a regular expression over module paths.
        blocks: the names of the module lists holding the transformer blocks, where the aside modules go
            (suffix match; the default covers BERT's ``encoder.layer``, ViT / Llama ``layers``, GPT-2's ``h``).
        connected: True: inside and aside modules (IAA); False: inside modules only (scattered).
        reduction_factor / bottleneck_size: the inside modules' r (as bottleneck adapters: d // 16 by default).
        aside_bottleneck_size: the aside modules' r (None: the same as the inside modules').
        non_linearity, scaling, dropout: as bottleneck adapters, for both kinds of module.
        init: as bottleneck adapters; "mam_adapter" (default) starts both at exactly the identity.
    """

    budget_field: ClassVar[str | None] = "bottleneck_size"
    targets: str | tuple[str, ...] | None = None
    inside: str = "pfeiffer"
    blocks: str | tuple[str, ...] = ("layer", "layers", "h")
    connected: bool = True
    aside_bottleneck_size: int | None = None
    non_linearity: str | None = "relu"
    init: str = "mam_adapter"

    def __post_init__(self) -> None:
        if isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", (self.blocks,))
        config_check(bool(self.blocks) and all(isinstance(b, str) and b.strip() for b in self.blocks), "blocks",
                     self.blocks, "names of module lists of transformer blocks, such as ('layer',) for BERT")
        config_check(isinstance(self.inside, str) and bool(self.inside.strip()), "inside", self.inside,
                     f"one of {', '.join(PLACEMENTS)} or a regular expression over module paths")
        if self.aside_bottleneck_size is not None:
            config_check(self.aside_bottleneck_size >= 1, "aside_bottleneck_size", self.aside_bottleneck_size,
                         "an integer >= 1, or None for the inside modules' size")
        if self.targets is None and not self.layer_types:
            object.__setattr__(self, "targets", self._derived_targets())
        super().__post_init__()

    def _derived_targets(self) -> str:
        inside = PLACEMENTS.get(self.inside, self.inside)
        if not self.connected:
            return inside
        return rf"{inside}|{self.block_pattern()}"

    def block_pattern(self) -> str:
        """The full-path expression of the blocks: `<anything>.<one of blocks>.<index>`."""
        return rf"(.*\.)?({'|'.join(re.escape(name) for name in self.blocks)})\.\d+"

    def aside_bottleneck(self, width: int) -> int:
        """r of an aside module on a block of this width."""
        return self.aside_bottleneck_size or self.bottleneck(width)


@register_method("iaa", IAAConfig,
                 "IAA connected modules (our reading): inside adapters joined by aside adapters around each block")
class IAADelta(BottleneckModule):
    """An inside module (on a projection layer: y + s·up(f(down(y)))) or an aside module (on a block:
    Block(h) + s·up(f(down(h)))), by the kind of module it is hosted on."""

    kind = DeltaKind.OUTPUT  # an inside module; an aside module sets DeltaKind.INPUT (it wraps the block's call)
    layer_kinds = frozenset({LINEAR, CONV1D_HF, MODULE})
    preserves_output_at_init = True  # both up-projections start at zero with the default init

    def __init__(self, config: IAAConfig, layer: LayerInfo, module_name: str = "") -> None:
        self.is_aside = layer.kind == MODULE
        width = layer.out_features
        if self.is_aside and width < 1:
            raise ConfigError(f"IAA cannot tell the width of block {module_name!r}; name blocks whose transformers "
                              "config has hidden_size, or end in a LayerNorm / Linear")
        size = config.aside_bottleneck(width) if self.is_aside else None
        super().__init__(config, layer, module_name, width, size)
        if self.is_aside:
            self.kind = DeltaKind.INPUT

    def transform_output(self, y: Tensor) -> Tensor:  # inside modules
        return y + self.bottleneck_output(y)

    def forward_around(self, module: nn.Module, run: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        found = block_token_input(args, kwargs)  # aside modules: read the block's input, add to its output
        if found is None:
            raise ConfigError(f"IAA's aside module on {self.module_name!r} found no token tensor (first argument or "
                              "hidden_states=); set IAAConfig(blocks=...) to the transformer blocks' list")
        aside = self.bottleneck_output(found[0])
        return _added_to_hidden(run(*args, **kwargs), aside, self.module_name)

    def extra_repr(self) -> str:
        role = "aside (around the block)" if self.is_aside else "inside (after the layer)"
        return f"{role}, bottleneck {self.adapter_down.out_features}"


def _added_to_hidden(output: Any, term: Tensor, where: str) -> Any:
    """A block's output with `term` added to its hidden states: a tensor, or a tuple whose first item is one."""
    if isinstance(output, Tensor):
        return output + term
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (output[0] + term, *output[1:])
    raise ConfigError(f"IAA's aside module on {where!r}: the block returned {type(output).__name__}, not hidden "
                      "states (a tensor or a tuple starting with one); set IAAConfig(blocks=...) to the blocks")

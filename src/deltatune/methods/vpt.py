"""VPT: Visual Prompt Tuning (Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim; ECCV 2022, arXiv:2203.12119).

Learned prompt tokens in the token sequence of a frozen ViT (our reading: /work/shared/methods/other.md §5.1,
from `KMnP/vpt:src/models/vit_prompt/vit.py`):

- shallow: before the first block the sequence becomes [cls; P; E] (P: `num_tokens` tokens), so prompts get
  no position embedding (they enter after the embedding block added it);
- deep: in addition, before every later block i the prompt slots are REPLACED by that block's own prompts, so
  the sequence length stays 1 + p + N through the model.

Hosted as INPUT deltas on the blocks (`config.blocks`.<i>, layer kind MODULE): block 0's delta inserts, every
other block's delta replaces. The classifier reads the CLS token as before (train it with
`extra_trainable=("classifier",)`). The frozen backbone stays in eval mode while training (capability
`KeepsBaseInEval`; `deltatune.set_training_mode`), as in VPT.

Init as VPT's code: U(-v, v), v = sqrt(6 / (patch_fan_in + width)) (xavier-uniform over the patch embedding's
fan-in and the width; VPT's 3·16·16 for ViT-B/16; GlyphViT: 1·4·4 = 16). Prompt dropout 0 and 5 tokens (VPT's
config defaults; the paper sweeps the length per task).

Saved tensors per block: ``prompt`` (num_tokens, width).

Limits: blocks that take an attention mask of the unprompted length (BERT layers) are not supported; use
prompt tuning (methods/prompt_tuning.py), which extends the mask at the model's input. Not mergeable.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import MODULE, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, config_check
from deltatune.functional.prompts import block_token_input, insert_tokens, replace_tokens, xavier_uniform_bound


@dataclass(frozen=True)
class VPTConfig(DeltaConfig):
    """VPT's hyper-parameters.

    Args:
        targets: None (the default) derives the blocks from `blocks` and `deep`; or name the blocks yourself.
        num_tokens: prompt tokens p per block (VPT's config default 5).
        deep: prompts before every block (VPT-deep) or only before the first (VPT-shallow).
        blocks: the name of the module list holding the transformer blocks (suffix match: ``layers`` for
            transformers 5 ViTs and ``nn.TransformerEncoder``; ``blocks`` for timm). `targets` is derived from it.
        prefix_tokens: tokens before the prompts (1: the CLS token).
        dropout: dropout on the prompts (VPT: 0).
        patch_fan_in: channels × patch height × patch width, for the init bound; 0 uses the width.
        hidden_size: token width; 0 reads it from the model (its config's hidden_size or the block's last
            parameter).
    """

    targets: str | tuple[str, ...] | None = None
    num_tokens: int = 5
    deep: bool = True
    blocks: str = "layers"
    prefix_tokens: int = 1
    dropout: float = 0.0
    patch_fan_in: int = 0
    hidden_size: int = 0
    budget_field = "num_tokens"

    def __post_init__(self) -> None:
        config_check(isinstance(self.blocks, str) and bool(self.blocks.strip()), "blocks", self.blocks,
                     "the name of the module list of transformer blocks, such as 'layers'")
        if self.targets is None and not self.layer_types:  # the blocks: all (deep) or the first (shallow)
            index = r"\d+" if self.deep else "0"
            object.__setattr__(self, "targets", rf"(.*\.)?{re.escape(self.blocks)}\.{index}")
        super().__post_init__()
        config_check(self.num_tokens >= 1, "num_tokens", self.num_tokens, "an integer >= 1 (VPT: 5 to 200)")
        config_check(self.prefix_tokens >= 0, "prefix_tokens", self.prefix_tokens, "an integer >= 0 (1: CLS)")
        config_check(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1) (VPT: 0)")
        config_check(self.patch_fan_in >= 0, "patch_fan_in", self.patch_fan_in, "an integer >= 0")
        config_check(self.hidden_size >= 0, "hidden_size", self.hidden_size, "an integer >= 0 (0: from the model)")


def block_index(module_name: str) -> int:
    """The block's position in its list: the last number of its path (`backbone.layers.3` -> 3)."""
    found = re.search(r"(\d+)$", module_name)
    return int(found.group(1)) if found else 0


@register_method("vpt", VPTConfig, "VPT: prompt tokens after CLS (shallow), replaced before every block (deep)")
class VPTDelta(Delta):
    """VPT: prompt tokens after CLS (shallow), replaced before every block (deep)."""

    kind = DeltaKind.INPUT
    layer_kinds = frozenset({MODULE})
    mergeable = False
    preserves_output_at_init = False  # prompts join attention from step 0

    def __init__(self, config: VPTConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        width = config.hidden_size or layer.out_features
        if width < 1:
            raise ConfigError(f"VPT cannot tell the token width of {module_name!r}; set VPTConfig(hidden_size=...)")
        self.inserts = block_index(module_name) == 0
        self.prompt = nn.Parameter(torch.empty(config.num_tokens, width))
        self.dropout = nn.Dropout(config.dropout)
        bound = xavier_uniform_bound(config.patch_fan_in or width, width)
        nn.init.uniform_(self.prompt, -bound, bound)

    def init_from_module(self, module: nn.Module) -> None:
        # Refuse at adapt time what is surely not a ViT block: one that takes rotary positions (a Llama layer).
        takes = inspect.signature(module.forward).parameters
        if any(name in takes for name in ("position_embeddings", "position_ids")):
            raise ConfigError(f"VPT on {self.module_name!r}: {type(module).__name__} takes positions sized for the "
                              "unprompted sequence; VPT supports ViT-style blocks, use prompt_tuning for text models")

    def keeps_base_in_eval(self) -> bool:
        return True

    def forward_around(self, module: nn.Module, run: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        _refuse_sequence_bound_inputs(kwargs, self.module_name)
        hidden, put_back = _hidden_states(args, kwargs, self.module_name)
        prompt = self.dropout(self.prompt)
        start = self.config.prefix_tokens
        prompted = insert_tokens(hidden, prompt, start) if self.inserts else replace_tokens(hidden, prompt, start)
        return run(*put_back(prompted), **kwargs)

    def extra_repr(self) -> str:
        action = "insert" if self.inserts else "replace"
        return f"kind=input, {action} {self.prompt.shape[0]} tokens of width {self.prompt.shape[1]}"


# Inputs a block receives that are sized for the unprompted sequence: inserting tokens would misalign them.
_SEQUENCE_BOUND = ("attention_mask", "position_embeddings", "position_ids")


def _refuse_sequence_bound_inputs(kwargs: dict, where: str) -> None:
    bound = [name for name in _SEQUENCE_BOUND if kwargs.get(name) is not None]
    if bound:
        raise ConfigError(f"VPT on {where!r}: the block also takes {bound[0]} sized for the unprompted sequence; "
                          "VPT supports ViT-style blocks, use prompt_tuning for text models")


def _hidden_states(args: tuple, kwargs: dict, where: str) -> tuple[Tensor, Callable[[Tensor], tuple]]:
    found = block_token_input(args, kwargs)
    if found is None:
        raise ConfigError(f"VPT on {where!r} found no token tensor (first argument or hidden_states=); "
                          "target the transformer blocks with VPTConfig(blocks=...)")
    return found

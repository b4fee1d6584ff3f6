"""Prompt tuning: soft prompts in front of the input (Lester, Al-Rfou, Constant; EMNLP 2021, arXiv:2104.08691).

    inputs_embeds = [P; E(input_ids)]        P ∈ R^{p×D} trained, the model frozen

Hosted as an INPUT delta on the module that takes ``input_ids`` / ``attention_mask`` (a transformers backbone:
``BertModel``, ``LlamaModel``; or a plain module with an input embedding): its call gets ``inputs_embeds`` with
the prompts in front, the attention mask (and token types) extended by p ones (zeros), position ids left to the
model (the prompts take the first positions, as in peft), and the prompts' outputs dropped from what it
returns, so heads, losses and ``generate`` see the sequence they passed. In generation the prompts go in with
the first call (empty cache) and stay in the key/value cache; later calls only get their mask extended.

Inits (peft's names): ``random`` U(-0.5, 0.5) (Lester et al.'s random uniform), ``vocabulary`` the embeddings
of `num_tokens` vocabulary ids drawn with `seed` (Lester et al.'s sampled vocabulary, from all ids), ``text``
the embeddings of `init_token_ids` repeated or cut to `num_tokens` (peft's TEXT init, with the ids given:
deltatune has no tokenizer in core).

Saved tensor: ``prompt`` (num_tokens, width). Not mergeable.
"""
from __future__ import annotations

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
from deltatune.functional.prompts import insert_tokens, prepend_to_mask, without_prompt_outputs

INITS = ("random", "vocabulary", "text")
RANDOM_RANGE = 0.5  # Lester et al. §3: random uniform init in [-0.5, 0.5]


@dataclass(frozen=True)
class PromptTuningConfig(DeltaConfig):
    """Prompt tuning's hyper-parameters.

    Args:
        targets: the module that takes input_ids (suffix names): ``backbone`` (deltatune's classifiers) or
            ``model`` (a transformers causal LM's base model).
        num_tokens: soft prompt length p (20: peft's examples; Lester et al. sweep 1-150).
        init: ``random``, ``vocabulary`` or ``text`` (see the module docstring).
        init_token_ids: token ids for ``text`` init.
        seed: the generator seed of the ``random`` and ``vocabulary`` inits.
        hidden_size: token width; 0 reads it from the input embedding.
    """

    targets: str | tuple[str, ...] | None = ("backbone", "model")
    num_tokens: int = 20
    init: str = "random"
    init_token_ids: tuple[int, ...] = ()
    seed: int = 0
    hidden_size: int = 0
    budget_field = "num_tokens"

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.num_tokens >= 1, "num_tokens", self.num_tokens, "an integer >= 1 (Lester et al.: 1-150)")
        config_check(self.init in INITS, "init", self.init, f"one of {', '.join(INITS)}")
        config_check(self.init != "text" or len(self.init_token_ids) > 0, "init_token_ids", self.init_token_ids,
                     "at least one token id when init='text'", "tokenize the init text and pass its ids")
        config_check(self.hidden_size >= 0, "hidden_size", self.hidden_size, "an integer >= 0 (0: from the model)")


def input_embedding(module: nn.Module) -> nn.Embedding:
    """The module's token embedding: transformers' `get_input_embeddings()`, else its first nn.Embedding."""
    getter = getattr(module, "get_input_embeddings", None)
    found = getter() if callable(getter) else next((m for m in module.modules() if isinstance(m, nn.Embedding)), None)
    if not isinstance(found, nn.Module) or not isinstance(getattr(found, "weight", None), Tensor):
        raise ConfigError(f"prompt tuning found no input embedding in {type(module).__name__}; target the module "
                          "that embeds input_ids (PromptTuningConfig(targets=...))")
    return found


@register_method("prompt_tuning", PromptTuningConfig, "Prompt tuning: trained soft prompt tokens before the input")
class PromptTuningDelta(Delta):
    """Prompt tuning: trained soft prompt tokens before the input."""

    kind = DeltaKind.INPUT
    layer_kinds = frozenset({MODULE})
    mergeable = False
    preserves_output_at_init = False  # the prompts join attention from step 0

    def __init__(self, config: PromptTuningConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        width = config.hidden_size or layer.out_features
        if width < 1:
            raise ConfigError(f"prompt tuning cannot tell the width of {module_name!r}; set hidden_size=...")
        self.prompt = nn.Parameter(torch.empty(config.num_tokens, width))

    def init_from_module(self, module: nn.Module) -> None:
        embedding = input_embedding(module)
        if embedding.weight.shape[-1] != self.prompt.shape[-1]:
            raise ConfigError(f"prompt tuning: hidden_size={self.prompt.shape[-1]} but {self.module_name!r} embeds "
                              f"to width {embedding.weight.shape[-1]}; leave hidden_size=0")
        generator = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            self.prompt.copy_(self._initial_prompt(embedding.weight.detach(), generator))

    def _initial_prompt(self, table: Tensor, generator: torch.Generator) -> Tensor:
        count = self.config.num_tokens
        if self.config.init == "random":
            return (torch.rand(count, table.shape[-1], generator=generator) * 2 - 1) * RANDOM_RANGE
        if self.config.init == "vocabulary":
            ids = torch.randint(0, table.shape[0], (count,), generator=generator)
        else:
            given = torch.tensor(self.config.init_token_ids, dtype=torch.long)
            if int(given.max()) >= table.shape[0] or int(given.min()) < 0:
                raise ConfigError(f"init_token_ids has ids outside the vocabulary of {table.shape[0]} tokens")
            ids = given.repeat(count // len(given) + 1)[:count]
        return table[ids.to(table.device)].cpu()

    def forward_around(self, module: nn.Module, run: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        kwargs = dict(kwargs)
        if args:  # the first positional argument of a transformers backbone is input_ids
            kwargs["input_ids"], args = args[0], args[1:]
        count = self.prompt.shape[0]
        _extend_masks(kwargs, count)
        kwargs.pop("position_ids", None)  # the model numbers the longer sequence itself (cache length included)
        kwargs.pop("cache_position", None)
        if _cache_length(kwargs.get("past_key_values")) > 0:  # generation after the first call: prompts cached
            return run(*args, **kwargs)
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            if ids is None:
                raise ConfigError(f"prompt tuning on {self.module_name!r} got neither input_ids nor inputs_embeds")
            embeds = input_embedding(module)(ids)
        kwargs["inputs_embeds"] = insert_tokens(embeds, self.prompt, 0)
        return without_prompt_outputs(run(*args, **kwargs), count)

    def extra_repr(self) -> str:
        return f"kind=input, {self.prompt.shape[0]} soft prompt tokens of width {self.prompt.shape[1]}"


def _extend_masks(kwargs: dict, count: int) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ConfigError("prompt tuning extends (batch, tokens) attention masks only; pass the 2-D mask")
        kwargs["attention_mask"] = prepend_to_mask(mask, count, 1)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = prepend_to_mask(kwargs["token_type_ids"], count, 0)


def _cache_length(cache: Any) -> int:
    """Tokens already in a key/value cache (0 for none or an empty one)."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0

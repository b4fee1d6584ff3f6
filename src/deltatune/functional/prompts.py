"""Pure tensor math of input-side deltas: put prompt tokens into a token sequence, take them out again, and
extend what describes the sequence (attention mask, token types). Tensors are (batch, tokens, width)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def insert_tokens(hidden: Tensor, prompts: Tensor, after: int) -> Tensor:
    """[hidden[:, :after]; prompts; hidden[:, after:]]: the sequence grows by len(prompts) (VPT shallow,
    prompt tuning with after=0). `prompts` is (tokens, width), shared by the batch."""
    batch = prompts.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
    return torch.cat([hidden[:, :after], batch, hidden[:, after:]], dim=1)


def replace_tokens(hidden: Tensor, prompts: Tensor, start: int) -> Tensor:
    """hidden with positions start .. start+len(prompts) replaced by `prompts` (VPT deep: the length stays)."""
    count = prompts.shape[0]
    batch = prompts.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
    return torch.cat([hidden[:, :start], batch, hidden[:, start + count:]], dim=1)


def drop_positions(hidden: Tensor, start: int, count: int) -> Tensor:
    """hidden without positions start .. start+count (the prompts' outputs)."""
    return torch.cat([hidden[:, :start], hidden[:, start + count:]], dim=1)


def prepend_to_mask(mask: Tensor, count: int, value: int = 1) -> Tensor:
    """A (batch, tokens) mask or token-type tensor with `count` columns of `value` in front."""
    front = torch.full((mask.shape[0], count), value, dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=1)


def without_prompt_outputs(output: Any, count: int) -> Any:
    """A model output with the first `count` positions dropped from its sequence tensors: a tensor, a tuple
    whose first item is one, or a transformers ModelOutput (`last_hidden_state`, `hidden_states`)."""
    if isinstance(output, Tensor):
        return output[:, count:]
    if isinstance(output, tuple):
        return (output[0][:, count:], *output[1:])
    if getattr(output, "last_hidden_state", None) is not None:
        output["last_hidden_state"] = output.last_hidden_state[:, count:]
    if getattr(output, "hidden_states", None) is not None:
        output["hidden_states"] = tuple(state[:, count:] for state in output.hidden_states)
    return output


def xavier_uniform_bound(fan_in: int, width: int) -> float:
    """VPT's prompt init bound v = sqrt(6 / (fan_in + width)) (fan_in: channels × patch area of the patch
    embedding, 3·16·16 for ViT-B/16)."""
    return math.sqrt(6.0 / (fan_in + width))


def block_token_input(args: tuple, kwargs: dict) -> tuple[Tensor, Callable[[Tensor], tuple]] | None:
    """A block call's token input (its first positional argument, or `hidden_states=`) and a function that puts
    a replacement back into the call's positional arguments (kwargs are updated in place); None if it has none."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda new: (new, *args[1:])
    if isinstance(kwargs.get("hidden_states"), Tensor):
        def put_back(new: Tensor) -> tuple:
            kwargs["hidden_states"] = new
            return args
        return kwargs["hidden_states"], put_back
    return None

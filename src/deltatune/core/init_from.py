"""`adapt(..., init_from=...)`: start a new adapter from the tensors of one trained elsewhere.

PVP (other.md §5.2) pre-trains prompts on a source task and uses them as the initialization of the target task's
prompts; nothing in that is prompt-specific, so it is one generic step of `adapt` for every method: each new
delta tensor is copied from the saved tensor under the same key (`<module path>.<tensor name>`, the keys of
`adapter_state_dict` and of the deltatune file). A missing key or another shape is refused by name, before
the model is touched. Tensors of `extra_trainable` modules (a head) in the source are ignored.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.core.files import check_saved_tensors, read_safetensors
from deltatune.errors import ConfigError

WEIGHTS_FILE = "deltatune_adapter.safetensors"  # the deltatune format's weights file (core/deltatune_format.py)


def source_tensors(init_from: str | os.PathLike | dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """The saved tensors and a name for messages: a deltatune adapter folder, its weights file, or a dict."""
    if isinstance(init_from, dict):
        return init_from, "init_from"
    path = Path(init_from)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ConfigError(f"init_from={str(init_from)!r} is not a deltatune adapter folder (no {WEIGHTS_FILE}); "
                          "pass a folder written by deltatune.save_adapter")
    return read_safetensors(weights), f"init_from {weights}"


def fill_from_adapter(deltas: list[tuple[str, nn.Module]], init_from: str | os.PathLike | dict[str, Tensor]) -> None:
    """Copy the saved tensors into the new (not yet attached) deltas; check every key and shape first."""
    saved, source = source_tensors(init_from)
    expected = {f"{path}.{key}": target for path, delta in deltas
                for key, target in delta.state_dict(keep_vars=True).items()}
    check_saved_tensors(expected, saved, source=source, error=ConfigError,
                        missing_fix="it was saved for another model, method or targets",
                        shape_fix="use the source adapter's config (prompt length, rank)")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(saved[key].to(device=target.device, dtype=target.dtype))

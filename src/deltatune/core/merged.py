"""`save_merged`: a standalone model with the active adapters folded in, loadable without deltatune.

For transformers models this is the model's own ``save_pretrained`` on a merged copy, so a plain
``AutoModel...from_pretrained(path)`` gives the adapted model's outputs. Other torch models get their merged
state dict as ``model.safetensors`` (load it with ``safetensors.torch.load_model``). The user's model is not
changed: the merge runs on a deep copy (which needs the model's memory once more while saving).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.core.model import iter_hosts, unload
from deltatune.errors import ConfigError, DeltatuneError

MERGED_WEIGHTS = "model.safetensors"


def save_merged(model: nn.Module, path: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Save `model` with its active adapters merged into folder `path`; `model` itself stays adapted and unchanged.

    Keyword arguments go to transformers' ``save_pretrained`` (``safe_serialization``, ``max_shard_size`` ...).
    Raises NotMergeableError (before writing anything) when an active adapter cannot be merged.
    """
    if not any(True for _ in iter_hosts(model)):
        raise DeltatuneError("save_merged: the model has no adapter to merge; save it with its own save method")
    merged = unload(copy.deepcopy(model), merge=True)
    _keep_untied_weights_untied(merged)
    folder = Path(path)
    if callable(getattr(merged, "save_pretrained", None)):
        merged.save_pretrained(folder, **save_pretrained_kwargs)
        return folder
    if save_pretrained_kwargs:
        raise ConfigError(
            f"save_merged: {sorted(save_pretrained_kwargs)} are save_pretrained options, but "
            f"{type(model).__name__} has no save_pretrained; drop them"
        )
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(merged, str(folder / MERGED_WEIGHTS))
    return folder


def _keep_untied_weights_untied(model: nn.Module) -> None:
    """An adapter on a head untied from the input embeddings (config untie=True) leaves two different
    tensors; a config still saying tie_word_embeddings=True would make from_pretrained tie them again and
    drop the merged head. Record the untying in the saved config."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and outputs is not None and inputs.weight is not outputs.weight:
        config.tie_word_embeddings = False

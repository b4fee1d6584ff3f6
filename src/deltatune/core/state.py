"""`load_adapter` and `save_adapter`: the user's entry points to adapter files, dispatched through the format
table (`deltatune.core.formats`).

The layers beneath, one concern each:

- `core.files`: reading JSON and safetensors safely, refusing pickles;
- `core.atomic`, `core.adapter_files`: atomic writes of the config + weights pair and the records a load checks;
- `core.attach`: an adapter's tensors out of a model (state dicts) and into it (attach-and-fill);
- `core.formats`: the (detect, load, save) table; its built-in entries are `core.deltatune_format` (the format
  documented there), `core.peft_format` (Hugging Face peft folders), `core.kohya_format` (kohya/A1111 and
  LyCORIS single files) and `core.diffusers_format` (diffusers' pytorch_lora_weights.safetensors), imported here
  so that they register.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

import deltatune.core.deltatune_format  # noqa: F401 - importing it registers the format
from deltatune.core.diffusers_format import DIFFUSERS_FORMAT  # noqa: F401 - importing it registers the format
from deltatune.core.formats import detect_format, format_named
from deltatune.core.kohya_format import KOHYA_FORMAT  # noqa: F401 - importing it registers the format
from deltatune.core.kohya_lycoris import LOHA_KIND  # noqa: F401 - importing it adds LoHa / LoKr to kohya files
from deltatune.core.model import adapter_state
from deltatune.core.peft_format import PEFT_FORMAT  # noqa: F401 - importing it registers the format


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", format: str = "deltatune") -> Path:
    """Save adapter `name` into folder `path` (created if missing; "." works). format: "deltatune" | "peft" |
    "kohya" (one ``.safetensors`` file: `path` is that file) | "diffusers" (``pytorch_lora_weights.safetensors``
    in folder `path`) (or any writable format registered with
    `deltatune.core.formats.register_format`).

    Writes only the adapter's two files (each atomically); other files in the folder are left as they are. A
    `path` that is an existing file other than the adapter's own is refused."""
    return format_named(format).save(model, path, name)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a deltatune or peft adapter folder, a kohya/LyCORIS file or a diffusers LoRA file (or any registered
    format) onto `model` as adapter `name` (made active).

    The model is left unchanged when anything about the file is wrong. Pickle files are refused, never read.
    Tensors holding NaN or infinite values are refused unless `allow_nonfinite=True`. A path that several
    registered formats claim is refused as ambiguous.
    """
    entry, location = detect_format(path)
    return entry.load(model, location, name, trainable=trainable, allow_nonfinite=allow_nonfinite)


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_state(model).configs)

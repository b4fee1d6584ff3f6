"""The deltatune adapter format: one entry of the format table (`deltatune.core.formats`).

A deltatune adapter folder holds two files:

- ``deltatune_config.json``: ``{"format": "deltatune", "format_version": 1, "method": ..., "config": {...},
  "extra_modules": [...], "deltatune_version": ...}``;
- ``deltatune_adapter.safetensors``: one tensor per key ``<module path>.<delta tensor name>`` (the names each
  method documents, e.g. ``encoder.layer.0.attention.self.query.lora_A``) plus the full parameters of the
  extra trainable modules under their own keys (``classifier.weight``), plus the running statistics of the
  model's normalization layers that track them (``bn1.running_mean``, ``bn1.running_var``,
  ``bn1.num_batches_tracked``; see `core.running_stats`), so that the loaded model reproduces the trained
  model's eval outputs. Loading sets those statistics on the model; a file without them (an older file, or a
  model without such layers) leaves the model's own. Adapter names are not in the keys, so a file loads under
  any name.

A save writes only these two files, each atomically, the config last; nothing else in the folder is touched
(see `deltatune.core.adapter_files`). The config records the weights file's size and sha256, which a load checks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.core.adapter_files import (
    check_weights_record,
    save_folder,
    with_weights_record,
    write_weights_then_config,
)
from deltatune.core.attach import adapter_state_dict, attach_adapter
from deltatune.core.files import read_json, read_safetensors, refuse_nonfinite
from deltatune.core.formats import AdapterFormat, AdapterLocation, folder_holds, other_markers, register_format
from deltatune.core.model import _config_of, extra_modules, iter_deltas, trainable_parameters
from deltatune.core.registry import entry_for_config, method_entry
from deltatune.core.running_stats import running_statistics
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.version import package_version

FORMAT_NAME = "deltatune"
FORMAT_VERSION = 1
CONFIG_FILE = "deltatune_config.json"
WEIGHTS_FILE = "deltatune_adapter.safetensors"


def save_deltatune_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` into folder `path` as the two deltatune files (each atomically)."""
    config = _config_of(model, name)
    folder = save_folder(path, (CONFIG_FILE, WEIGHTS_FILE), other_markers(FORMAT_NAME))
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model, name).items()}
    tensors |= {k: v.detach().contiguous() for k, v in running_statistics(model).items() if k not in tensors}
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": entry_for_config(config).name,
        "config": config.to_dict(),
        "extra_modules": [p for p, _ in extra_modules(model, config)],
        "deltatune_version": package_version(),
    }
    # Parameters, not stored values: sparse methods also store buffers (positions, masks, base values).
    adapter_parameters = _adapter_parameter_count(model, name, config)
    meta["adapter_parameters"] = adapter_parameters
    meta["model_parameters"] = trainable_parameters(model).total - adapter_parameters
    write_weights_then_config(folder, WEIGHTS_FILE, CONFIG_FILE, tensors, {"format": "pt", "method": meta["method"]},
                              with_weights_record(meta))
    return folder


def _adapter_parameter_count(model: nn.Module, name: str, config: Any) -> int:
    """Parameters of adapter `name`: its deltas' and its extra trainable modules'."""
    deltas = sum(p.numel() for _, _, delta in iter_deltas(model, name) for p in delta.parameters())
    return deltas + sum(p.numel() for _, module in extra_modules(model, config) for p in module.parameters())


def load_deltatune_adapter(model: nn.Module, location: AdapterLocation, name: str = "default", *,
                           trainable: bool = False, allow_nonfinite: bool = False) -> nn.Module:
    """Read a deltatune folder and attach it to `model` as adapter `name` (the model unchanged on any error)."""
    config, tensors = read_deltatune_folder(location.folder, allow_nonfinite=allow_nonfinite)
    return attach_adapter(model, config, tensors, name, trainable, source=location.folder)


def read_deltatune_folder(folder: Path, *, allow_nonfinite: bool = False) -> tuple[Any, dict[str, Any]]:
    """The method config and tensors of a deltatune folder, checked (format fields, the weights file's recorded
    size and hash, and finite values unless allowed); nothing is attached."""
    meta = read_json(folder / CONFIG_FILE)
    config = config_from_meta(meta, folder / CONFIG_FILE)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    check_weights_record(meta, folder / WEIGHTS_FILE, folder / CONFIG_FILE)
    if not allow_nonfinite:
        refuse_nonfinite(tensors, folder / WEIGHTS_FILE)
    return config, tensors


def config_from_meta(meta: dict[str, Any], source: Path) -> Any:
    """The method config a deltatune_config.json describes, after checking its format fields."""
    check_format_fields(meta, source)
    entry = method_entry(meta["method"])
    try:
        return entry.config_cls.from_dict(meta["config"])
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def check_format_fields(meta: dict[str, Any], source: Path) -> None:
    """`format` is "deltatune", `format_version` an integer this version reads, `method` a string and
    `config` a JSON object; anything else is refused by name (a newer or foreign file is never guessed at)."""
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise AdapterFileError(f"{source}: format={fmt!r} is not a deltatune adapter (expected 'deltatune'); "
                               "convert it with the tool that wrote it")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AdapterFileError(f"{source}: format_version={version!r} is invalid: expected an integer from 1 to "
                               f"{FORMAT_VERSION}; re-save the adapter")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{source}: format_version {version} was written by a newer deltatune (this one "
                               f"reads up to {FORMAT_VERSION}); upgrade deltatune")
    if not isinstance(meta.get("method"), str):
        raise AdapterFileError(f"{source}: method={meta.get('method')!r} is invalid: expected a method name "
                               "string such as 'lora'; re-save the adapter")
    if not isinstance(meta.get("config"), dict):
        raise AdapterFileError(f"{source}: config={meta.get('config')!r} is invalid: expected a JSON object of "
                               "the method's fields; re-save the adapter")


DELTATUNE_FORMAT = register_format(AdapterFormat(
    FORMAT_NAME, detect=folder_holds(CONFIG_FILE), load=load_deltatune_adapter, save=save_deltatune_adapter,
    marker=CONFIG_FILE, files=(CONFIG_FILE, WEIGHTS_FILE),
))

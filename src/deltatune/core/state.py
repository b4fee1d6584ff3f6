"""Adapter state dicts and the deltatune file format.

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

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from deltatune.core.adapter_files import check_weights_record, save_folder, with_weights_record, write_weights_then_config
from deltatune.core.model import (
    _config_of, adapt, adapter_state, delete_adapter, extra_modules, iter_deltas, set_trainable,
    trainable_parameters,
)
from deltatune.core.registry import entry_for_config, method_entry
from deltatune.core.running_stats import running_statistics
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError

FORMAT_VERSION = 1
CONFIG_FILE = "deltatune_config.json"
WEIGHTS_FILE = "deltatune_adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Every tensor that defines adapter `name`: its deltas' parameters and persistent buffers, and the
    parameters of its extra trainable modules. Keys are independent of the adapter name."""
    config = _config_of(model, name)
    state: dict[str, Tensor] = {}
    for path, _, delta in iter_deltas(model, name):
        for key, tensor in delta.state_dict().items():
            state[f"{path}.{key}"] = tensor
    for path, module in extra_modules(model, config):
        for key, tensor in module.state_dict().items():
            state[f"{path}.{key}" if path else key] = tensor
    return state


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a training checkpoint must keep: every trainable parameter and every delta tensor, under the
    model's own state-dict keys (base keys unchanged by adaptation)."""
    state = model.state_dict(keep_vars=True)
    statistics = running_statistics(model)  # changed by train-mode forwards: needed to resume exactly
    return {
        key: tensor.detach()
        for key, tensor in state.items()
        if ".deltas." in f".{key}" or (isinstance(tensor, nn.Parameter) and tensor.requires_grad) or key in statistics
    }


def load_trainable_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise AdapterFileError(
            f"checkpoint has tensors the model lacks, first {result.unexpected_keys[0]!r}; "
            "was it written for another model or adapter configuration?"
        )


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", format: str = "deltatune") -> Path:
    """Save adapter `name` into folder `path` (created if missing; "." works). format: "deltatune" | "peft".

    Writes only the adapter's two files (each atomically); other files in the folder are left as they are. A
    `path` that is an existing file other than the adapter's own is refused."""
    if format == "peft":
        from deltatune.core.peft_format import save_peft_adapter

        return save_peft_adapter(model, path, name)
    if format != "deltatune":
        raise DeltatuneError(f"format={format!r} is unknown; use 'deltatune' or 'peft'")
    config = _config_of(model, name)
    folder = save_folder(path, (CONFIG_FILE, WEIGHTS_FILE), "adapter_config.json", "peft")
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model, name).items()}
    tensors |= {k: v.detach().contiguous() for k, v in running_statistics(model).items() if k not in tensors}
    meta = {
        "format": "deltatune",
        "format_version": FORMAT_VERSION,
        "method": entry_for_config(config).name,
        "config": config.to_dict(),
        "extra_modules": [p for p, _ in extra_modules(model, config)],
        "deltatune_version": _version(),
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


def load_adapter(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a deltatune or peft LoRA adapter folder onto `model` as adapter `name` (made active).

    The model is left unchanged when anything about the file is wrong. Pickle files are refused, never read.
    Tensors holding NaN or infinite values are refused unless `allow_nonfinite=True`.
    """
    folder = _adapter_folder(Path(path))
    if _exists(folder / CONFIG_FILE):
        meta = read_json(folder / CONFIG_FILE)
        config = config_from_meta(meta, folder / CONFIG_FILE)
        tensors = read_safetensors(folder / WEIGHTS_FILE)
        check_weights_record(meta, folder / WEIGHTS_FILE, folder / CONFIG_FILE)
        if not allow_nonfinite:
            refuse_nonfinite(tensors, folder / WEIGHTS_FILE)
        return attach_adapter(model, config, tensors, name, trainable, source=folder)
    from deltatune.core.peft_format import load_peft_adapter

    return load_peft_adapter(model, folder, name, trainable=trainable, allow_nonfinite=allow_nonfinite)


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
    if fmt != "deltatune":
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


def refuse_nonfinite(tensors: dict[str, Tensor], source: Path) -> None:
    """Refuse a file whose floating tensors hold NaN or infinite values: they give NaN outputs silently."""
    for key in sorted(tensors):
        tensor = tensors[key]
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterFileError(
                f"{source}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the adapter "
                "is broken (re-train or re-save it), or pass allow_nonfinite=True to load it anyway"
            )


def attach_adapter(
    model: nn.Module, config: Any, tensors: dict[str, Tensor], name: str, trainable: bool, source: Path
) -> nn.Module:
    """Inject `config` as adapter `name` and fill it with `tensors`, or roll back and raise."""
    adapt(model, config, name, trainable=trainable)
    try:
        _fill_adapter(model, name, tensors, source)
    except BaseException:
        delete_adapter(model, name)
        raise
    if not trainable:
        for _, _, delta in iter_deltas(model, name):
            delta.requires_grad_(False)
    else:
        set_trainable(model, name)
    return model


def _fill_adapter(model: nn.Module, name: str, tensors: dict[str, Tensor], source: Path) -> None:
    expected = adapter_state_dict(model, name)
    statistics = _saved_statistics(model, tensors, expected, source)
    tensors = {k: v for k, v in tensors.items() if k not in statistics}
    for key, target in expected.items():
        if key not in tensors:
            raise AdapterFileError(f"{source} has no tensor {key!r} that this model's adapter needs; "
                                   "was it saved for another model or config?")
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise AdapterFileError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)} but the model expects "
                f"{tuple(target.shape)}; the adapter was saved for a different model or rank"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterFileError(f"{source} has tensor {unexpected[0]!r} that matches nothing in the model; "
                               "was it saved for another model?")
    for key, target in expected.items():
        _check_dtype_kind(tensors[key], target, key, source)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
        for key, (target, saved) in statistics.items():
            target.copy_(saved)


def _saved_statistics(
    model: nn.Module, tensors: dict[str, Tensor], expected: dict[str, Tensor], source: Path
) -> dict[str, tuple[Tensor, Tensor]]:
    """The file's normalization statistics, key -> (model buffer, saved tensor): all of the model's or none."""
    buffers = {k: v for k, v in running_statistics(model).items() if k not in expected}
    present = [key for key in buffers if key in tensors]
    if not present:
        return {}
    missing = [key for key in buffers if key not in tensors]
    if missing:
        raise AdapterFileError(
            f"{source} has running statistics for {len(present)} of this model's normalization buffers but not "
            f"{missing[0]!r}; was it saved for another model?"
        )
    for key in present:
        if tuple(tensors[key].shape) != tuple(buffers[key].shape):
            raise AdapterFileError(
                f"{source}: statistics {key!r} have shape {tuple(tensors[key].shape)} but the model expects "
                f"{tuple(buffers[key].shape)}; the adapter was saved for a different model"
            )
    return {key: (buffers[key], tensors[key]) for key in present}


def _dtype_kind(tensor: Tensor) -> str:
    return "complex" if tensor.is_complex() else "float" if tensor.is_floating_point() else str(tensor.dtype)


def _check_dtype_kind(tensor: Tensor, target: Tensor, key: str, source: Path) -> None:
    """Floats load into floats of any precision (deltas follow the base dtype); integer and boolean tensors
    (positions, masks) must keep their exact dtype, since a cast would change what they index."""
    if _dtype_kind(tensor) != _dtype_kind(target):
        raise AdapterFileError(f"{source}: tensor {key!r} has dtype {tensor.dtype} but the model expects "
                               f"{target.dtype}; the file is corrupt or was written for another method")


ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, "adapter_config.json", "adapter_model.safetensors")


def _adapter_folder(path: Path) -> Path:
    if not _exists(path):
        raise AdapterFileError(_dangling(path, "adapter path") or
                               f"adapter path {path} does not exist; pass the folder written by save_adapter")
    if not path.is_dir():
        if path.suffix in PICKLE_SUFFIXES:
            raise AdapterFileError(_pickle_refusal(path))
        if path.name not in ADAPTER_FILES:
            raise AdapterFileError(f"adapter path {path} is a file, not an adapter folder; pass the folder that "
                                   f"holds {CONFIG_FILE} (deltatune) or adapter_config.json (peft)")
        path = path.parent
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as error:
        raise AdapterFileError(f"adapter folder {path} cannot be listed ({_reason(error)}); "
                               "check its permissions") from None
    if CONFIG_FILE in names or "adapter_config.json" in names:
        return path
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise AdapterFileError(_pickle_refusal(path))
    raise AdapterFileError(
        f"{path} has no {CONFIG_FILE} (deltatune) or adapter_config.json (peft); the config file is missing"
    )


def _exists(path: Path) -> bool:
    """Path.exists that reports an unreadable parent folder instead of raising PermissionError."""
    try:
        return path.exists()
    except OSError as error:
        raise AdapterFileError(f"{path} cannot be checked ({_reason(error)}); check the folder's permissions") from None


def _dangling(path: Path, what: str) -> str | None:
    """The message for a symbolic link that loops or points nowhere (Path.exists says False for both)."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13: a symlink loop
        return f"{what} {path} is a symbolic link loop; point it at the real file or folder"
    except OSError as error:
        return (f"{what} {path} is a symbolic link to a missing path ({_reason(error)}); point it at the real "
                "file or folder")
    return None


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _readable_file(path: Path, what: str) -> None:
    """A missing file, a folder where the file should be: one line naming the path and the fix."""
    if not _exists(path):
        raise AdapterFileError(_dangling(path, what) or f"{what} {path} is missing; the adapter folder is incomplete")
    if path.is_dir():
        raise AdapterFileError(f"{what} {path} is a folder, not a file; remove it and re-save the adapter")
    try:  # readers written in other languages (safetensors) would report a permission problem as corruption
        with open(path, "rb"):
            pass
    except OSError as error:
        raise AdapterFileError(f"{what} {path} cannot be read ({_reason(error)}); check its permissions") from None


def _pickle_refusal(path: Path) -> str:
    return (f"{path} holds a pickle file; deltatune never unpickles adapters (it can run arbitrary code). "
            "Convert it to safetensors with the library that wrote it")


def read_json(path: Path) -> dict[str, Any]:
    _readable_file(path, "config file")
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise AdapterFileError(f"config file {path} cannot be read ({_reason(error)}); check its permissions") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, too-long integers
        raise AdapterFileError(f"config file {path} is not valid JSON ({_one_line(error)}); "
                               "re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"config file {path} must hold a JSON object, not {type(data).__name__}; "
                               "re-save the adapter")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    _readable_file(path, "weights file")
    try:
        return load_file(str(path))
    except OSError as error:
        raise AdapterFileError(f"weights file {path} cannot be read ({_reason(error)}); check its permissions") from None
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterFileError(f"weights file {path} is corrupt or truncated ({_one_line(error)}); "
                               "re-save the adapter") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def _version() -> str:
    from deltatune import __version__

    return __version__


def adapter_names(model: nn.Module) -> list[str]:
    return list(adapter_state(model).configs)

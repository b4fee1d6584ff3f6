"""Reading the files of an adapter folder, safely: JSON configs, safetensors weights, and pickles refused.

Every reader turns what can go wrong with a file (missing, a folder in its place, unreadable, corrupt, holding
NaN) into one `AdapterFileError` line naming the path and the fix. Writing lives beside it:
`deltatune.core.atomic` (atomic files and folders) and `deltatune.core.adapter_files` (the config + weights
pair with its records). Nothing here knows a file format's fields or a model.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from deltatune.errors import AdapterFileError, DeltatuneError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def exists(path: Path) -> bool:
    """Path.exists that reports an unreadable parent folder instead of raising PermissionError."""
    try:
        return path.exists()
    except OSError as error:
        raise AdapterFileError(f"{path} cannot be checked ({reason(error)}); check the folder's permissions") from None


def dangling(path: Path, what: str) -> str | None:
    """The message for a symbolic link that loops or points nowhere (Path.exists says False for both)."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13: a symlink loop
        return f"{what} {path} is a symbolic link loop; point it at the real file or folder"
    except OSError as error:
        return (f"{what} {path} is a symbolic link to a missing path ({reason(error)}); point it at the real "
                "file or folder")
    return None


def reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def readable_file(path: Path, what: str) -> None:
    """A missing file, a folder where the file should be: one line naming the path and the fix."""
    if not exists(path):
        raise AdapterFileError(dangling(path, what) or f"{what} {path} is missing; the adapter folder is incomplete")
    if path.is_dir():
        raise AdapterFileError(f"{what} {path} is a folder, not a file; remove it and re-save the adapter")
    try:  # readers written in other languages (safetensors) would report a permission problem as corruption
        with open(path, "rb"):
            pass
    except OSError as error:
        raise AdapterFileError(f"{what} {path} cannot be read ({reason(error)}); check its permissions") from None


def is_pickle(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES)


def pickle_refusal(path: Path) -> str:
    return (f"{path} holds a pickle file; deltatune never unpickles adapters (it can run arbitrary code). "
            "Convert it to safetensors with the library that wrote it")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path` (a config file); anything else is refused by name."""
    readable_file(path, "config file")
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise AdapterFileError(f"config file {path} cannot be read ({reason(error)}); check its permissions") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, too-long integers
        raise AdapterFileError(f"config file {path} is not valid JSON ({one_line(error)}); "
                               "re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"config file {path} must hold a JSON object, not {type(data).__name__}; "
                               "re-save the adapter")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the safetensors file `path` (never a pickle: safetensors holds only raw tensors)."""
    readable_file(path, "weights file")
    try:
        return load_file(str(path))
    except OSError as error:
        raise AdapterFileError(f"weights file {path} cannot be read ({reason(error)}); check its permissions") from None
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt headers
        raise AdapterFileError(f"weights file {path} is corrupt or truncated ({one_line(error)}); "
                               "re-save the adapter") from None


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


def check_saved_tensors(expected: Mapping[str, Tensor], saved: Mapping[str, Tensor], *, source: object,
                        error: type[DeltatuneError], missing_fix: str, shape_fix: str) -> None:
    """Every tensor `expected` names is in `saved` with its shape, else one `error` naming the first bad key.

    Shared by a load (`core.attach`) and `adapt(..., init_from=)`: both copy saved tensors into an adapter only
    after this check, so a refused file leaves the model untouched."""
    for key, target in expected.items():
        if key not in saved:
            raise error(f"{source} has no tensor {key!r} that this adapter needs; {missing_fix}")
        if tuple(saved[key].shape) != tuple(target.shape):
            raise error(f"{source}: tensor {key!r} has shape {tuple(saved[key].shape)} but the model expects "
                        f"{tuple(target.shape)}; {shape_fix}")

"""Checks run before a merge reads any tensor data: compatible checkpoints, a safe output location."""
from __future__ import annotations

import json
from pathlib import Path

from deltatune.errors import MergeError
from deltatune.merging.io.checkpoint import Checkpoint


def _describe(checkpoint: Checkpoint) -> str:
    return f"{checkpoint.label} {checkpoint.path}"


def check_compatible(reference: Checkpoint, other: Checkpoint, cast: bool) -> None:
    """Same tensor names (the first difference named), same shapes, same dtypes unless `cast`."""
    missing = [n for n in reference.tensors if n not in other.tensors]
    extra = [n for n in other.tensors if n not in reference.tensors]
    if missing or extra:
        name, how = (missing[0], "is missing") if missing else (extra[0], "is extra")
        count = len(missing) + len(extra) - 1
        more = f" (and {count} more differences)" if count else ""
        raise MergeError(f"{_describe(other)}: tensor {name!r} {how} compared with {_describe(reference)}{more}; "
                         "merge checkpoints of the same architecture")
    for name, info in reference.tensors.items():
        theirs = other.tensors[name]
        if theirs.shape != info.shape:
            raise MergeError(f"tensor {name!r} has shape {theirs.shape} in {_describe(other)} but {info.shape} in "
                             f"{_describe(reference)}; merge checkpoints of the same architecture")
        if theirs.dtype != info.dtype and not cast and info.dtype.is_floating_point:
            raise MergeError(f"tensor {name!r} is {theirs.dtype} in {_describe(other)} but {info.dtype} in "
                             f"{_describe(reference)}; set dtype: (e.g. float32) in the config to cast all inputs")


def check_output_location(out_dir: Path, inputs: list[Checkpoint], overwrite: bool) -> None:
    """The output must not be, contain, or sit inside an input; an existing non-empty folder needs overwrite."""
    out = out_dir.resolve()
    for checkpoint in inputs:
        source = checkpoint.path.resolve()
        inside = source.is_dir() and source in out.parents  # a file input's folder may hold the output
        if out == source or out in source.parents or inside:
            raise MergeError(f"output {out_dir} overlaps the input {source}; inputs are never modified, "
                             "choose an output folder outside every input")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise MergeError(f"output {out_dir} already exists and is not empty; pass --overwrite to replace it "
                         "or choose another folder")


def read_model_config(config_file: Path) -> dict:
    """A model folder's config.json as a JSON object; unreadable, non-UTF-8 or non-object files are a MergeError."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise MergeError(f"cannot read {config_file}: {error.strerror}; check its permissions") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        raise MergeError(f"{config_file} is not valid UTF-8 JSON; fix or restore it") from None
    if not isinstance(config, dict):
        raise MergeError(f"{config_file} must hold a JSON object, not {type(config).__name__}; fix or restore it")
    return config


def layer_count(reference: Checkpoint) -> int | None:
    config_file = reference.folder / "config.json" if reference.folder else None
    if config_file and config_file.is_file():
        config = read_model_config(config_file)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(config.get(key), int):
                return config[key]
    return None

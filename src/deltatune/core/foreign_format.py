"""What the single-file formats of other tools (kohya/LyCORIS `core.kohya_format`, diffusers
`core.diffusers_format`) share: reading a safetensors header cheaply for `detect`, writing one weights file
atomically without overwriting a file deltatune did not write, exact targets for the modules a file names, and
the warning for what such files cannot hold.

These files carry no deltatune config, so a load rebuilds the method config from the tensors (through the
method's peft conversion, `PeftConvertibleConfig.from_peft_config`, which honours or refuses every field) and a
save writes only what the other tool reads.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deltatune.core.atomic import staged_files
from deltatune.core.blueprint import planned_layers
from deltatune.core.config import DeltaConfig
from deltatune.core.model import extra_modules
from deltatune.core.running_stats import running_statistics
from deltatune.errors import AdapterFileError, DeltatuneError

WRITER_KEY = "deltatune_format"  # safetensors metadata: which deltatune format wrote the file (overwrite check)


def header(path: Path) -> tuple[list[str], dict[str, str]] | None:
    """(tensor keys, metadata) of a safetensors file, from its header only; None when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except Exception:  # not safetensors, truncated, unreadable: not ours to claim; the reader reports why
        return None


def refuse_foreign_overwrite(target: Path, format_name: str) -> None:
    """A save replaces `target` only when it is a file deltatune wrote in this format (its metadata says so):
    a downloaded or hand-made file of the same name is never overwritten."""
    if not target.exists():
        return
    if target.is_dir():
        raise AdapterFileError(f"{target} is a folder; pass a file path ending in .safetensors")
    found = header(target)
    if found is None or found[1].get(WRITER_KEY) != format_name:
        raise AdapterFileError(f"{target} already exists and was not written by deltatune's {format_name} save; "
                               "choose another path (or delete that file yourself)")


def write_weights(target: Path, tensors: dict[str, Tensor], metadata: dict[str, str], format_name: str) -> Path:
    """Write `tensors` to `target` through a temporary sibling renamed over it (`core.atomic`)."""
    with staged_files(target) as (staged,):
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(staged.temp),
                  metadata={**metadata, WRITER_KEY: format_name})
    return target


def refuse_extras(model: nn.Module, config: DeltaConfig, format_name: str) -> None:
    """Other tools' LoRA files hold deltas only: extra trainable modules (a classifier head) would be lost."""
    extras = [path for path, _ in extra_modules(model, config)]
    if extras:
        raise DeltatuneError(f"format={format_name!r} files hold only the adapter's deltas, not extra trainable "
                             f"modules ({extras[0]!r}); save with format='deltatune' (or 'peft') to keep them")


def warn_statistics_left_out(model: nn.Module, format_name: str) -> None:
    left_out = list(running_statistics(model))
    if left_out:
        warnings.warn(
            f"format={format_name!r} leaves out the running statistics of the model's normalization layers "
            f"({len(left_out)} buffers, first {left_out[0]!r}): a reloaded adapter runs with the base model's "
            "statistics; save with format='deltatune' to keep them", UserWarning, stacklevel=4,
        )


def exact_targets(model: nn.Module, config: DeltaConfig, paths: list[str]) -> DeltaConfig:
    """`config` adapting exactly `paths`. Names match by suffix (``conv_out`` also matches ``mid.conv_out``), so
    when the names select more than `paths` the targets become a regular expression of the exact paths."""
    config = dataclasses.replace(config, targets=tuple(sorted(paths)))
    if sorted(path for path, _ in planned_layers(model, config)) == sorted(paths):
        return config
    exact = "|".join(re.escape(path) for path in sorted(paths))
    return dataclasses.replace(config, targets=f"(?:{exact})")


def one_value(values: dict[str, float], what: str, source: Path, fix: str) -> float:
    """The single value `values` (module -> value) share; refused by name when modules differ."""
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        first = next(iter(values))
        other = next(module for module, value in values.items() if value != values[first])
        raise AdapterFileError(f"{source}: {what} differs between modules ({first!r}: {values[first]:g}, "
                               f"{other!r}: {values[other]:g}); deltatune's adapters have one {what}; {fix}")
    return distinct[0]

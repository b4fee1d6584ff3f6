"""The table of adapter file formats that `load_adapter` and `save_adapter` dispatch through.

A format is one `AdapterFormat` entry: `detect` (does this location hold my files?), `load` and `save`.
`register_format` adds one; the built-in entries are the deltatune format (`core.deltatune_format`) and
peft's (`core.peft_format`). A load finds the one format whose `detect` accepts the path and refuses a path
that several formats claim (it would otherwise load whichever was registered first). Other formats — kohya's
and diffusers' LoRA files — join by registering an entry; `load_adapter` itself never changes.

    register_format(AdapterFormat("kohya", detect=is_kohya_file, load=load_kohya))  # a read-only format

`detect` gets an `AdapterLocation`: the folder and its file names, or the single file the user named.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from deltatune.core.files import PICKLE_SUFFIXES, dangling, exists, is_pickle, pickle_refusal, reason
from deltatune.errors import AdapterFileError, DeltatuneError


@dataclass(frozen=True)
class AdapterLocation:
    """Where a load looks. `folder` and its file `names`; `file` is the file the user named when it is not one
    of a format's own files (a single-file format's weights), else None and `names` lists the folder."""

    folder: Path
    names: frozenset[str]
    file: Path | None = None


class AdapterLoader(Protocol):
    def __call__(self, model: nn.Module, location: AdapterLocation, name: str, *, trainable: bool,
                 allow_nonfinite: bool) -> nn.Module: ...


class AdapterSaver(Protocol):
    def __call__(self, model: nn.Module, path: str | os.PathLike, name: str) -> Path: ...


@dataclass(frozen=True)
class AdapterFormat:
    """One file format: how to recognize, read and write it.

    `marker` is the file whose presence makes a folder this format's (its config); a save of another format
    refuses a folder holding it. `files` are the files a save writes: a load path naming one of them means its
    folder. `save` is None for a format deltatune only imports."""

    name: str
    detect: Callable[[AdapterLocation], bool]
    load: AdapterLoader
    save: AdapterSaver | None = None
    marker: str | None = None
    files: tuple[str, ...] = ()


_FORMATS: dict[str, AdapterFormat] = {}


def register_format(entry: AdapterFormat) -> AdapterFormat:
    """Add `entry` to the table (detection order is registration order; detection refuses overlaps)."""
    if entry.name in _FORMATS and _FORMATS[entry.name] is not entry:
        raise DeltatuneError(f"adapter format {entry.name!r} is registered twice; give the new one another name")
    _FORMATS[entry.name] = entry
    return entry


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


def registered_formats() -> list[AdapterFormat]:
    return list(_FORMATS.values())


def folder_holds(marker: str) -> Callable[[AdapterLocation], bool]:
    """The detector of a folder format: the folder (or one of the formats' own files in it) holds `marker`."""
    return lambda location: location.file is None and marker in location.names


def format_named(name: str) -> AdapterFormat:
    """The entry a save writes with; unknown and read-only formats are refused by name."""
    writable = [f"{entry.name!r}" for entry in _FORMATS.values() if entry.save is not None]
    entry = _FORMATS.get(name)
    if entry is None or entry.save is None:
        raise DeltatuneError(f"format={name!r} is unknown; use {' or '.join(writable)}")
    return entry


def other_markers(name: str) -> list[tuple[str, str]]:
    """(marker file, format name) of every folder format but `name`: a save must not land beside them."""
    return [(entry.marker, entry.name) for entry in _FORMATS.values() if entry.marker and entry.name != name]


def detect_format(path: str | os.PathLike) -> tuple[AdapterFormat, AdapterLocation]:
    """The one registered format that holds `path`, and where; pickles, foreign files and overlaps refused."""
    location = locate(Path(path))
    found = [entry for entry in _FORMATS.values() if entry.detect(location)]
    if len(found) == 1:
        return found[0], location
    where = location.file or location.folder
    if found:
        names = ", ".join(entry.name for entry in found)
        raise AdapterFileError(f"{where} holds adapter files of several formats ({names}), so which one to load is "
                               "ambiguous; move all but one format's files into another folder")
    if location.file is not None:
        raise AdapterFileError(f"adapter path {where} is a file, not an adapter folder, and not a single-file "
                               "adapter (a kohya/LyCORIS or diffusers LoRA .safetensors); pass the folder that "
                               f"holds {_markers_text()}")
    if any(is_pickle(name) for name in location.names):
        raise AdapterFileError(pickle_refusal(location.folder))
    raise AdapterFileError(f"{where} has no {_markers_text()}; the config file is missing")


def adapter_folder(path: str | os.PathLike) -> Path:
    """The folder of the adapter at `path` (a folder, or one of its files)."""
    return detect_format(path)[1].folder


def locate(path: Path) -> AdapterLocation:
    """`path` as a location: a folder, or the folder of a format's own file, listed; any other file as itself."""
    if not exists(path):
        raise AdapterFileError(dangling(path, "adapter path") or
                               f"adapter path {path} does not exist; pass the folder written by save_adapter")
    if not path.is_dir():
        if path.suffix in PICKLE_SUFFIXES:
            raise AdapterFileError(pickle_refusal(path))
        if path.name not in {name for entry in _FORMATS.values() for name in entry.files}:
            return AdapterLocation(path.parent, frozenset(), file=path)
        path = path.parent
    try:
        names = frozenset(p.name for p in path.iterdir())
    except OSError as error:
        raise AdapterFileError(f"adapter folder {path} cannot be listed ({reason(error)}); "
                               "check its permissions") from None
    return AdapterLocation(path, names)


def _markers_text() -> str:
    return " or ".join(f"{entry.marker} ({entry.name})" for entry in _FORMATS.values() if entry.marker)

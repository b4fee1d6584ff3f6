"""Writing an adapter's two files into a folder the user may share with anything else.

A save writes only its own two files (config + weights), each atomically (`deltatune.core.atomic.staged_files`),
and never deletes or renames anything else in the folder. The weights are renamed into place first and the
config last, so the config is the commit point. A crash between the two renames leaves new weights beside the
old config; the pair records which weights belong to which config so a load detects that and says so:

- deltatune folders: the config records the weights file's size and sha256 (``weights_bytes``,
  ``weights_sha256``);
- peft folders (whose config peft reads, warning about unknown keys): the weights' safetensors metadata records
  the sha256 of the config's canonical JSON (``deltatune_config_sha256``).

Folders without the record (older saves, peft's own) load as before.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from deltatune.core.atomic import staged_files
from deltatune.errors import AdapterFileError

WEIGHTS_DIGEST = "weights_sha256"
WEIGHTS_BYTES = "weights_bytes"
CONFIG_DIGEST = "deltatune_config_sha256"
_CHUNK = 1 << 20


def save_folder(path: str | os.PathLike, own_files: tuple[str, ...], foreign: Iterable[tuple[str, str]]) -> Path:
    """The folder a save writes into: `path` itself, or the folder of `path` when it names one of the
    adapter's own files. Refuses an existing other file, and a folder holding another format's config
    (`foreign`: (config file, format name) pairs), which would be read instead of (or beside) the new adapter."""
    target = Path(path)
    if target.is_file():
        if target.name not in own_files:
            raise AdapterFileError(f"{target} is an existing file, not an adapter folder; pass a folder path "
                                   f"(the save writes {' and '.join(own_files)} into it)")
        target = target.parent
    for foreign_config, foreign_format in foreign:
        if (target / foreign_config).is_file():
            raise AdapterFileError(f"{target} already holds a {foreign_format} adapter ({foreign_config}); saving "
                                   "beside it would leave two adapters that loaders pick between; choose another "
                                   "folder")
    return target


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True)


def canonical_digest(config: dict[str, Any]) -> str:
    """sha256 of the config's content (key order and whitespace do not count)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_weights_then_config(folder: Path, weights_name: str, config_name: str, tensors: dict[str, Tensor],
                              metadata: dict[str, str], config: dict[str, Any] | Callable[[int, str], dict]) -> None:
    """Write the weights file and the config into `folder`, the config renamed last.

    `config` is the config itself, or a function of the weights' (size, sha256) that returns it."""
    with staged_files(folder / weights_name, folder / config_name) as (weights, config_file):
        save_file(tensors, str(weights.temp), metadata=metadata)
        if callable(config):
            config = config(*file_digest(weights.temp))
        config_file.temp.write_text(config_text(config))


def with_weights_record(meta: dict[str, Any]) -> Callable[[int, str], dict[str, Any]]:
    return lambda size, sha256: {**meta, WEIGHTS_BYTES: size, WEIGHTS_DIGEST: sha256}


def check_weights_record(meta: dict[str, Any], weights: Path, config: Path) -> None:
    """Refuse weights that are not the ones `meta` (read from `config`) was saved with."""
    if WEIGHTS_DIGEST not in meta or not weights.is_file():
        return  # an older save without the record; a missing file is reported by the reader
    size = weights.stat().st_size
    if size != meta.get(WEIGHTS_BYTES) or file_digest(weights)[1] != meta[WEIGHTS_DIGEST]:
        raise AdapterFileError(_torn_message(weights, config))


def check_config_record(peft_config: dict[str, Any], weights: Path, config: Path) -> None:
    """Refuse a peft folder whose weights were saved (by deltatune) with a different config."""
    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(CONFIG_DIGEST)
    except Exception:  # unreadable headers are reported, with their reason, by the reader
        return
    if recorded is not None and recorded != canonical_digest(peft_config):
        raise AdapterFileError(f"{weights} was saved with another {config.name} (the sha256 it records differs): "
                               "a save was interrupted between writing the two files, or the config was edited "
                               "since; save the adapter again")


def _torn_message(weights: Path, config: Path) -> str:
    return (f"{weights} is not the file {config.name} was saved with (size or sha256 differ from its record): a "
            "save was interrupted between writing the two files, or the weights were changed since; save the "
            "adapter again")

"""Atomic file and folder writes: write to a temporary sibling, fsync, then rename over the target.

A crash or an exception mid-write leaves either the old content or nothing, never a half-written file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deltatune.errors import AdapterFileError


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` (and parents) or raise a clear error when it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AdapterFileError(
            f"cannot create output directory {directory}: {error.strerror}; choose a writable location"
        ) from None
    if not os.access(directory, os.W_OK):
        raise AdapterFileError(f"output directory {directory} is not writable; choose a writable location")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[object]:
    """Open a temporary file next to `path`; on success fsync it and rename it to `path`."""
    target = Path(path)
    ensure_writable_dir(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)  # type: ignore[attr-defined]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it replaces `path` as a whole.

    An existing `path` is swapped out only after the new content is complete and synced.
    """
    target = Path(path)
    ensure_writable_dir(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        for child in staging.iterdir():
            if child.is_file():
                _fsync_path(child)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

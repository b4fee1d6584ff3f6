"""Atomic file and folder writes that survive a kill -9 at any instant.

- `atomic_file` / `staged_files`: each file is written to a temporary sibling, fsynced, then renamed over its
  target, and the folder is fsynced. Nothing else in the folder is touched.
- `atomic_directory`: a whole folder (a checkpoint, a merge output) is built in a hidden staging sibling and
  swapped in. On Linux the swap is one `renameat2(RENAME_EXCHANGE)`: the final path holds the complete old or
  the complete new folder at every instant. Where the file system cannot exchange, the old folder is renamed
  aside first; if the process dies between the two renames, the next write to that path renames it back.

Temporary names carry the writer's process id (``.<name>.<pid>-<random>.tmp | .staging | .old``), so the next
write to the same path removes what a dead process left behind (and restores an aside copy when the final path
is missing). New files and folders get the mode the umask gives (0644 / 0755 under umask 022).

Write failures (disk full, read-only file system, no permission — also when torch or safetensors wrap them in
their own exception) become one `AdapterFileError` naming the path and the fix; the previous content is kept and
no temporary file is left.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deltatune.errors import AdapterFileError, DeltatuneError

# Errors that only a write produces: always a write failure, wherever they were raised.
WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# Errors a read can produce too: a write failure only when they name the output location (or nothing).
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}
FIXES = {
    errno.ENOSPC: "free disk space or choose another location",
    errno.EDQUOT: "free space in your disk quota or choose another location",
    errno.EFBIG: "the file is too large for this file system; choose another location",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "check the folder's permissions or choose a writable location",
    errno.EPERM: "check the folder's permissions or choose a writable location",
}
_RUST_OS_ERROR = re.compile(r"os error (\d+)")  # safetensors reports I/O errors as "... (os error 28)"
_LITTER_KINDS = ("tmp", "staging", "old")
_LEGACY_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")  # what earlier versions left aside
AT_FDCWD = -100
RENAME_EXCHANGE = 2

_active: set[str] = set()  # temporary paths this process is writing right now (never litter)
_active_lock = threading.Lock()
_umask_lock = threading.Lock()


# --- modes, syncing ------------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (`/proc/self/status`)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:  # elsewhere the only way to read it is to set it and put it back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    return 0o777 & ~current_umask()


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str | os.PathLike) -> None:
    """Make renames and creations inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems refuse fsync on folders; the data files were synced
        if error.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Give everything below `root` the umask's mode (safetensors writes 0600 files, mkdtemp 0700 folders)
    and make it durable."""
    files_mode, folders_mode = file_mode(), folder_mode()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, files_mode)
                fsync_file(path)
        os.chmod(folder, folders_mode)
        fsync_folder(folder)


# --- write failures as one line ------------------------------------------------------------------------------
def ensure_writable_dir(directory: Path) -> None:
    """Create `directory` (and parents) or raise a clear error when it cannot be written."""
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"{directory} is a file, not a folder; choose an output location whose folders "
                               "are folders")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AdapterFileError(
            f"cannot create output directory {directory}: {error.strerror}; choose a writable location"
        ) from None
    if not os.access(directory, os.W_OK):
        raise AdapterFileError(f"output directory {directory} is not writable; choose a writable location")


def _errno_of(error: BaseException) -> tuple[int, str | None] | None:
    """The OS error behind `error`: itself, what it was raised from or during, or safetensors' message."""
    seen = 0
    current: BaseException | None = error
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno, current.filename
        match = _RUST_OS_ERROR.search(str(current))
        if match:
            return int(match.group(1)), None
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def write_failure(error: BaseException, target: Path) -> AdapterFileError | None:
    """`error` as one line naming `target` and the fix, or None when it is not a failure to write there."""
    if isinstance(error, DeltatuneError):
        return None
    found = _errno_of(error)
    if found is None:
        return None
    number, filename = found
    if number not in WRITE_ONLY_ERRNOS:
        if number not in ACCESS_ERRNOS or not _names_output(filename, target):
            return None
    return AdapterFileError(f"cannot write {target}: {os.strerror(number)}; {FIXES[number]} "
                            "(the previous content, if any, is unchanged)")


def _names_output(filename: str | None, target: Path) -> bool:
    if filename is None:
        return True
    folder = os.path.abspath(target.parent)
    return os.path.abspath(filename).startswith(folder + os.sep) or os.path.abspath(filename) == folder


@contextlib.contextmanager
def write_errors(target: str | os.PathLike) -> Iterator[None]:
    """Turn a failure to write `target` (see `write_failure`) into an `AdapterFileError`; re-raise the rest."""
    try:
        yield
    except Exception as error:
        failure = write_failure(error, Path(target))
        if failure is None:
            raise
        raise failure from None


# --- litter of earlier writes ----------------------------------------------------------------------------------
def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-"


def _litter_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(?P<pid>\d+)-\w+\.(?P<kind>{'|'.join(_LITTER_KINDS)})$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _is_litter(path: Path, pid: int) -> bool:
    """Left behind: its writer is dead, or it is this process's own and no longer being written."""
    if pid == os.getpid():
        with _active_lock:
            return str(path) not in _active
    return not _process_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_litter(target: Path) -> None:
    """Remove the temporary files and staging folders that dead writers of `target` left behind; when `target`
    is missing but a complete old copy was renamed aside (a crash mid-swap), rename that copy back first."""
    folder = target.parent
    pattern = _litter_pattern(target.name)
    asides: list[Path] = []
    try:
        children = list(folder.iterdir())
    except OSError:
        return
    for child in children:
        match = pattern.match(child.name)
        legacy = _LEGACY_ASIDE.match(child.name)
        if legacy and legacy.group("name") == target.name and not os.path.lexists(target):
            os.rename(child, target)  # restored, never deleted: it may be a user's file an older version hid
        elif match and _is_litter(child, int(match.group("pid"))):
            if match.group("kind") == "old":
                asides.append(child)
            else:
                _remove(child)
    if asides and not os.path.lexists(target):
        newest = max(asides, key=lambda p: p.lstat().st_ctime)  # a rename updates ctime: the last one aside
        os.rename(newest, target)
        asides.remove(newest)
    for aside in asides:
        _remove(aside)


@contextlib.contextmanager
def _registered(path: str | os.PathLike) -> Iterator[None]:
    with _active_lock:
        _active.add(str(path))
    try:
        yield
    finally:
        with _active_lock:
            _active.discard(str(path))


# --- single files --------------------------------------------------------------------------------------------
@dataclass
class StagedFile:
    """A temporary sibling of `target`, to be filled and then renamed over it."""

    target: Path
    temp: Path
    mode: int  # the target's mode (a new target: the umask's), given at commit: writers may recreate the file

    def commit(self) -> None:
        os.chmod(self.temp, self.mode)
        fsync_file(self.temp)


def _new_temp_file(target: Path) -> StagedFile:
    """An empty temporary sibling of `target` (mkstemp: private until committed)."""
    mode = target.stat().st_mode & 0o7777 if target.is_file() else file_mode()
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    return StagedFile(target, Path(name), mode)


def _check_file_target(target: Path) -> None:
    if target.is_dir():
        raise AdapterFileError(f"{target} is a folder; expected a file path (or move the folder away)")


@contextlib.contextmanager
def staged_files(*targets: str | os.PathLike) -> Iterator[list[StagedFile]]:
    """Temporary siblings of `targets` to fill; on success each is fsynced and renamed over its target in the
    order given (so the last target is the commit point), then the folders are fsynced. On any failure the
    temporary files are removed and the targets keep their old content."""
    paths = [Path(t) for t in targets]
    for path in paths:
        ensure_writable_dir(path.parent)
        _check_file_target(path)
        clean_litter(path)
    staged: list[StagedFile] = []
    with contextlib.ExitStack() as stack:
        try:
            with write_errors(paths[0]):
                for path in paths:
                    staged.append(_new_temp_file(path))
                    stack.enter_context(_registered(staged[-1].temp))
                yield staged
                for item in staged:
                    item.commit()
                for item in staged:
                    os.replace(item.temp, item.target)
                for folder in dict.fromkeys(p.parent for p in paths):
                    fsync_folder(folder)
        finally:
            for item in staged:
                with contextlib.suppress(FileNotFoundError):
                    item.temp.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[object]:
    """Open a temporary file next to `path`; on success fsync it and rename it to `path`."""
    with staged_files(path) as (staged,):
        with open(staged.temp, mode) as handle:
            yield handle
            handle.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)  # type: ignore[attr-defined]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- whole folders -------------------------------------------------------------------------------------------
def _renameat2():
    """libc's renameat2 (glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Swap two paths in one atomic step; False when this system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(number, os.strerror(number), os.fspath(second))


def _swap_in(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; afterwards `staging` holds the old content (if any), for deletion."""
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif not exchange(staging, target):
        aside = target.with_name(f"{_temp_prefix(target.name)}{secrets.token_hex(4)}.old")
        with _registered(aside):
            os.rename(target, aside)
            os.rename(staging, target)  # a crash just before this leaves the aside copy, restored next time
            os.rename(aside, staging)
    fsync_folder(target.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder to fill; on success it replaces `path` as a whole, in one atomic step.

    An existing `path` is swapped out only after the new content is complete and synced; the old content is
    deleted afterwards. On failure the staging folder is deleted and `path` is unchanged.
    """
    target = Path(os.path.abspath(path))
    ensure_writable_dir(target.parent)
    clean_litter(target)
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".staging", dir=target.parent))
    try:
        with _registered(staging), write_errors(target):
            yield staging
            _finish_tree(staging)
            _swap_in(staging, target)
    finally:
        _remove(staging)

"""Safetensors checkpoints read one tensor at a time and written as they are produced.

Reading: only the JSON headers are parsed up front (a model folder with `model.safetensors.index.json`, a
folder with one `*.safetensors`, or a single file); each tensor is read on request with `os.preadv` straight into
a fresh tensor — no mmap, so a process's resident memory holds only the tensors it still references.
Truncated or corrupt files are detected from the headers before any merge starts.

Writing: output shapes and dtypes are known before any data is computed, so each shard's header is written
first and every tensor is appended the moment it is ready: no output buffer (mergekit holds up to a whole
shard, 5 GB by default, in memory). The layout is the safetensors format (8-byte little-endian header length,
JSON header padded to 8 bytes, raw little-endian data), readable by `safetensors` and transformers.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from deltatune.errors import MergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape, and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def dtype_code(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_CODES:
        raise MergeError(f"dtype {dtype} cannot be stored in safetensors here; use one of "
                         f"{', '.join(str(d).removeprefix('torch.') for d in DTYPE_CODES)}")
    return DTYPE_CODES[dtype]


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _header_entry(path: Path, name: str, entry: object, data_start: int, data_bytes: int) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise MergeError(f"{path}: header entry {name!r} is corrupt or uses an unsupported dtype; "
                         "re-save the checkpoint with safetensors") from None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != _numel(shape) * itemsize or begin < 0:
        raise MergeError(f"{path}: tensor {name!r} claims {end - begin} bytes for shape {shape}; "
                         "the file is corrupt, re-save it")
    if end > data_bytes:
        raise MergeError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has "
                         f"{data_start + data_bytes} bytes; download or copy the shard again")
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; raise MergeError for a missing, corrupt or truncated file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise MergeError(f"{path} is truncated ({size} bytes): not a safetensors file; copy it again")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(MAX_HEADER_BYTES, size - 8):
                raise MergeError(f"{path} is corrupt or truncated: header claims {header_bytes} bytes of a "
                                 f"{size}-byte file; copy or re-save it")
            header = json.loads(handle.read(header_bytes))
    except FileNotFoundError:
        raise MergeError(f"{path} does not exist; check the model path") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MergeError(f"{path} is corrupt: its header is not valid JSON; re-save the checkpoint") from None
    except OSError as error:
        raise MergeError(f"cannot read {path}: {error.strerror}; check the path and permissions") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path} is corrupt: its header is not a JSON object; re-save the checkpoint")
    header.pop("__metadata__", None)
    start = 8 + header_bytes
    return {name: _header_entry(path, name, entry, start, size - start) for name, entry in header.items()}


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except OSError as error:
            raise MergeError(f"cannot read {index}: {error.strerror}; check its permissions") from None
        except (ValueError, KeyError, TypeError, RecursionError):  # also UnicodeDecodeError
            raise MergeError(f"{index} is corrupt (no valid weight_map); re-save the checkpoint") from None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n for n in weight_map.values()):
            raise MergeError(f"{index} is corrupt (its weight_map must map tensor names to shard file names); "
                             "re-save the checkpoint")
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{folder} has no *.safetensors files; save the model with safe_serialization=True "
                         "(or convert .bin weights) first")
    return files


class Checkpoint:
    """A safetensors model (folder or file) whose tensors are read lazily, one at a time."""

    def __init__(self, path: str | os.PathLike, label: str = "model") -> None:
        self.path = Path(path)
        self.label = label
        if not self.path.exists():
            raise MergeError(f"{label} {self.path} does not exist; check the path in the config")
        self.folder = self.path if self.path.is_dir() else None
        files = _shard_files(self.path) if self.folder else [self.path]
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise MergeError(f"{label} {self.path}: tensor {name!r} appears in two shards; re-save it")
                self.tensors[name] = info
        self._handles: dict[Path, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"

    def names_in_file_order(self) -> list[str]:
        """Tensor names sorted by (file, offset): the order that reads each shard front to back."""
        return sorted(self.tensors, key=lambda n: (str(self.tensors[n].file), self.tensors[n].start))

    def read(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Read one tensor into a new CPU tensor (cast to `dtype` if given)."""
        info = self.tensors[name]
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._read_into(info, buffer)
        tensor = buffer.view(info.dtype).reshape(info.shape)
        return tensor if dtype is None or dtype == info.dtype else tensor.to(dtype)

    def _read_into(self, info: TensorInfo, buffer: Tensor) -> None:
        with self._lock:
            fd = self._handles.get(info.file)
            if fd is None:
                fd = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
        view, done = memoryview(buffer.numpy()), 0
        while done < info.nbytes:
            count = os.preadv(fd, [view[done:]], info.start + done)
            if count <= 0:
                raise MergeError(f"{info.file} ended early while reading {info.name!r}; the file changed or is "
                                 "truncated, copy it again")
            done += count

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own shard)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Write one safetensors file whose header is known up front; `write` tensors in the planned order."""

    def __init__(self, path: Path, tensors: Sequence[OutputTensor], metadata: dict[str, str] | None = None):
        # larger item sizes first keeps every tensor aligned to its element size, as safetensors itself does
        self.order = sorted(tensors, key=lambda t: -torch.empty((), dtype=t.dtype).element_size())
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for tensor in self.order:
            header[tensor.name] = {"dtype": dtype_code(tensor.dtype), "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.path = path
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def expects(self) -> str | None:
        return self.order[self._next].name if self._next < len(self.order) else None

    def write(self, name: str, tensor: Tensor) -> None:
        expected = self.order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise MergeError(f"writer expected {expected} but got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            self._file.close()
            raise MergeError(f"{self.path}: {len(self.order) - self._next} tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def write_index(folder: Path, shards: Iterable[tuple[str, Sequence[OutputTensor]]]) -> None:
    """The HF `model.safetensors.index.json` for a sharded output."""
    weight_map, total = {}, 0
    for file_name, tensors in shards:
        for tensor in tensors:
            weight_map[tensor.name] = file_name
            total += tensor.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

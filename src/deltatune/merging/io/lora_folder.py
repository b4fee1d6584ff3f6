"""Writing peft LoRA folders tensor by tensor: the output side of `extract_lora` and `resize_lora`.

The factors' ranks are only known after each layer's SVD, so a safetensors header cannot be written first (as
`io.checkpoint.ShardWriter` does for merges). `SpooledTensors` appends each tensor's bytes to a scratch file in the
staging folder as it is produced and remembers where it is; `finish` then writes ``adapter_model.safetensors``
(header first, tensors copied back one at a time, each optionally zero-padded to a common rank). Memory stays at
one tensor; the cost is one extra sequential write of the adapter.

The folder holds ``adapter_config.json`` (peft's LoraConfig), ``adapter_model.safetensors`` and a JSON report
(`REPORT_NAME`) that also marks the folder as written by deltatune: an existing output folder is only ever replaced
(`overwrite=True`) when it carries that marker, never a folder some other tool wrote.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.errors import MergeError
from deltatune.merging.io.checkpoint import OutputTensor, ShardWriter

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
REPORT_NAME = "lora_report.json"
PREFIX = "base_model.model."
TOOL_FIELD = "written_by"
LAYOUTS = ("padded", "pattern")


@dataclass(frozen=True)
class _Spooled:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SpooledTensors:
    """Tensors appended to a scratch file as they come, then written as one safetensors file."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._file = open(scratch, "w+b")
        self._entries: dict[str, _Spooled] = {}
        self._offset = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._entries:
            raise MergeError(f"tensor {name!r} was produced twice; report this as a bug")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._entries[name] = _Spooled(name, tensor.dtype, tuple(tensor.shape), self._offset, data.numel())
        self._offset += data.numel()

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def _read(self, entry: _Spooled) -> Tensor:
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        view, done = memoryview(buffer.numpy()), 0
        while done < entry.nbytes:
            count = os.preadv(self._file.fileno(), [view[done:]], entry.offset + done)
            if count <= 0:
                raise MergeError(f"the scratch file {self.scratch} ended early while reading {entry.name!r}; it was "
                                 "changed by another process, run again")
            done += count
        return buffer.view(entry.dtype).reshape(entry.shape)

    def finish(self, path: Path, reshape: Callable[[str, Tensor], Tensor] | None = None,
               shapes: dict[str, tuple[int, ...]] | None = None, metadata: dict[str, str] | None = None) -> int:
        """Write every spooled tensor into the safetensors file `path` (through `reshape(name, tensor)`, whose
        result shapes are `shapes[name]` when given); return the file's size. The scratch file is removed."""
        self._file.flush()
        shapes = shapes or {}
        outputs = [OutputTensor(e.name, e.dtype, shapes.get(e.name, e.shape)) for e in self._entries.values()]
        writer = ShardWriter(path, outputs, metadata or {"format": "pt"})
        try:
            while (name := writer.expects()) is not None:
                tensor = self._read(self._entries[name])
                writer.write(name, reshape(name, tensor) if reshape is not None else tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            self._file.close()
            self.scratch.unlink(missing_ok=True)
        return path.stat().st_size


def pad_rank(tensor: Tensor, rank: int, axis: int) -> Tensor:
    """Zero-pad `tensor` along `axis` (A's rows: 0, B's columns: 1) to `rank`: the extra directions add exact 0."""
    if tensor.shape[axis] == rank:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = rank
    padded = tensor.new_zeros(shape)
    padded.narrow(axis, 0, tensor.shape[axis]).copy_(tensor)
    return padded


def peft_lora_config(ranks: dict[str, int], layout: str, modules_to_save: list[str], *, bias: bool,
                     base_model: str | None, task_type: str | None) -> dict[str, Any]:
    """peft's adapter_config.json for factors with ΔW = B A (scale 1: lora_alpha = r, per layer under "pattern").

    `ranks` maps module paths to their rank. "padded": every layer is stored at the largest rank (zero-padded),
    one r for all; "pattern": each layer at its own rank through peft's rank_pattern / alpha_pattern (what
    mergekit-extract-lora writes; smaller). Both load in peft and in deltatune (LoRAConfig's patterns, peft's
    matching rule); the pattern keys are the full module paths.
    """
    top = max(ranks.values())
    pattern = {path: rank for path, rank in sorted(ranks.items()) if rank != top} if layout == "pattern" else {}
    return {
        "peft_type": "LORA", "base_model_name_or_path": base_model, "task_type": task_type,
        "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "modules_to_save": sorted(modules_to_save) or None,
        "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": bias,
        "init_lora_weights": True, "use_dora": False, "inference_mode": True,
    }


def check_replaceable(out: Path, overwrite: bool, tool: str) -> None:
    """An existing non-empty `out` is replaced only with `overwrite` and only when `tool` wrote it."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MergeError(f"output {out} is an existing file; choose a folder path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise MergeError(f"output {out} already exists and is not empty; pass --overwrite (overwrite=True) to "
                         f"replace a folder {tool} wrote, or choose another folder")
    try:
        written_by = json.loads((out / REPORT_NAME).read_text(encoding="utf-8")).get(TOOL_FIELD)
    except (OSError, ValueError, AttributeError):
        written_by = None
    if written_by != tool:
        raise MergeError(f"output {out} was not written by {tool} (no {REPORT_NAME} of it inside); refusing to "
                         "replace a folder another tool wrote: delete it yourself or choose another folder")


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def print_table(layers: list[dict[str, Any]], totals: dict[str, Any], stream: Any = None) -> None:
    """The per-layer report as a text table (rank, relative Frobenius error, energy kept)."""
    width = max([len(row["name"]) for row in layers] + [5])
    print(f"{'layer':<{width}}  {'shape':>13}  {'rank':>5}  {'rel. error':>10}  {'energy':>8}", file=stream)
    for row in layers:
        shape = "x".join(str(s) for s in row["shape"])
        print(f"{row['name']:<{width}}  {shape:>13}  {row['rank']:>5}  {row['relative_error']:>10.4g}  "
              f"{row['energy_kept']:>8.5f}", file=stream)
    print(f"{len(layers)} layers, {totals['parameters']:,} LoRA parameters, total relative error "
          f"{totals['relative_error']:.4g}, ranks {totals['min_rank']}-{totals['max_rank']}", file=stream)


def totals_of(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-adapter figures: parameters, and the relative error over all layers, sqrt(Σ err²) / sqrt(Σ ‖ΔW‖²)."""
    norm = sum(row["norm"] ** 2 for row in layers) ** 0.5
    error = sum(row["error"] ** 2 for row in layers) ** 0.5
    ranks = [row["rank"] for row in layers] or [0]
    return {"layers": len(layers), "parameters": sum(row["parameters"] for row in layers),
            "relative_error": error / norm if norm > 0 else 0.0, "min_rank": min(ranks), "max_rank": max(ranks)}

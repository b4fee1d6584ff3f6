"""Describe a saved adapter folder without loading a model: config, per-module tensors, sizes."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from deltatune.core.peft_format import PEFT_CONFIG, PEFT_WEIGHTS
from deltatune.core.state import CONFIG_FILE, WEIGHTS_FILE, _adapter_folder, read_json
from deltatune.errors import AdapterFileError


@dataclass
class AdapterSummary:
    path: Path
    format: str
    method: str
    config: dict
    modules: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    file_bytes: int = 0
    model_parameters: int | None = None

    @property
    def parameters(self) -> int:
        return sum(_numel(shape) for tensors in self.modules.values() for shape in tensors.values())

    def render(self) -> str:
        lines = [f"adapter  {self.path}  ({self.format} format, method {self.method})",
                 f"config   {json.dumps(self.config, sort_keys=True)}", "", "module  tensors"]
        for module, tensors in self.modules.items():
            shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in tensors.items())
            lines.append(f"  {module}  {shapes}")
        share = ""
        if self.model_parameters:
            share = f" ({100 * self.parameters / (self.model_parameters + self.parameters):.4f}% of the adapted model)"
        lines += ["", f"parameters  {self.parameters:,}{share}", f"file size   {self.file_bytes / 1024:,.1f} KiB"]
        return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:
        raise AdapterFileError(f"weights file {path} is corrupt or truncated ({error}); re-save the adapter") from None


def _group_by_module(shapes: dict[str, tuple[int, ...]], tensor_suffixes: int) -> dict[str, dict[str, tuple]]:
    grouped: dict[str, dict[str, tuple]] = {}
    for key in sorted(shapes):
        parts = key.split(".")
        module, name = ".".join(parts[:-tensor_suffixes]), ".".join(parts[-tensor_suffixes:])
        grouped.setdefault(module, {})[name] = shapes[key]
    return grouped


def summarize_adapter(path: str | Path) -> AdapterSummary:
    folder = _adapter_folder(Path(path))
    if (folder / CONFIG_FILE).exists():
        meta = read_json(folder / CONFIG_FILE)
        weights = folder / WEIGHTS_FILE
        summary = AdapterSummary(folder, "deltatune", str(meta.get("method")), meta.get("config", {}),
                                 model_parameters=meta.get("model_parameters"))
        summary.modules = _group_by_module(_tensor_shapes(weights), 1)
    else:
        meta = read_json(folder / PEFT_CONFIG)
        weights = folder / PEFT_WEIGHTS
        summary = AdapterSummary(folder, "peft", str(meta.get("peft_type")), meta)
        shapes = {k.removeprefix("base_model.model."): v for k, v in _tensor_shapes(weights).items()}
        summary.modules = _group_by_module({k.removesuffix(".weight"): v for k, v in shapes.items()}, 1)
    summary.file_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return summary

"""Describe a saved adapter folder (or a kohya / diffusers file) without loading a model: config, per-module
tensors, sizes."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from deltatune.core.deltatune_format import CONFIG_FILE, WEIGHTS_FILE, check_format_fields
from deltatune.core.diffusers_format import METADATA_KEY, weights_file
from deltatune.core.files import one_line, read_json, readable_file
from deltatune.core.formats import detect_format
from deltatune.core.kohya_format import kohya_file
from deltatune.core.peft_format import PEFT_CONFIG, PEFT_WEIGHTS
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
    adapter_parameters: int | None = None  # recorded at save; older files and peft folders lack it
    ranks: dict[str, int] = field(default_factory=dict)  # live ranks of budget-adaptive methods

    @property
    def stored_values(self) -> int:
        return sum(_numel(shape) for tensors in self.modules.values() for shape in tensors.values())

    @property
    def parameters(self) -> int:
        """The adapter's parameters (the file's values when the count was not recorded: LoRA-like files)."""
        return self.stored_values if self.adapter_parameters is None else self.adapter_parameters

    def render(self) -> str:
        lines = [f"adapter  {self.path}  ({self.format} format, method {self.method})",
                 f"config   {json.dumps(self.config, sort_keys=True)}", "", "module  tensors"]
        for module, tensors in self.modules.items():
            shapes = ", ".join(f"{name} {tuple(shape)}" for name, shape in tensors.items())
            lines.append(f"  {module}  {shapes}")
        share = ""
        if self.model_parameters:
            share = f" ({100 * self.parameters / (self.model_parameters + self.parameters):.4f}% of the adapted model)"
        lines += ["", f"parameters  {self.parameters:,}{share}"]
        if self.stored_values != self.parameters:
            lines.append(f"stored      {self.stored_values:,} values (parameters + buffers: positions, masks, ...)")
        lines.append(f"file size   {self.file_bytes / 1024:,.1f} KiB")
        if self.ranks:
            lines += ["", *_rank_lines(self.ranks)]
        return "\n".join(lines)


def _rank_lines(ranks: dict[str, int]) -> list[str]:
    """The allocated ranks as a layers x modules table (the text form of `plot_rank_heatmap`)."""
    from deltatune.allocate.describe import rank_table

    layers, modules, grid = rank_table(ranks)
    width = max(len(m) for m in modules)
    total = sum(ranks.values())
    lines = [f"final ranks (total {total}, mean {total / len(ranks):.2f} over {len(ranks)} modules)",
             "  " + "layer".ljust(7) + "".join(m.rjust(width + 2) for m in modules)]
    for layer, row in zip(layers, grid):
        cells = "".join(("-" if value != value else str(int(value))).rjust(width + 2) for value in row)
        lines.append("  " + layer.ljust(7) + cells)
    return lines


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    readable_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:
        raise AdapterFileError(f"weights file {path} is corrupt or truncated ({one_line(error)}); re-save the adapter"
                               ) from None


def _allocated_ranks(path: Path) -> dict[str, int]:
    """Module path -> live rank, from the rank masks a budget-adaptive adapter saves (empty for the others)."""
    from deltatune.allocate.describe import MASK_KEY, ranks_from_tensors

    with safe_open(str(path), framework="pt") as handle:
        masks = {key: handle.get_tensor(key) for key in handle.keys() if key.endswith("." + MASK_KEY)}
    return ranks_from_tensors(masks)


def _group_by_module(shapes: dict[str, tuple[int, ...]], tensor_suffixes: int) -> dict[str, dict[str, tuple]]:
    grouped: dict[str, dict[str, tuple]] = {}
    for key in sorted(shapes):
        parts = key.split(".")
        module, name = ".".join(parts[:-tensor_suffixes]), ".".join(parts[-tensor_suffixes:])
        grouped.setdefault(module, {})[name] = shapes[key]
    return grouped


def _group_peft_keys(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple]]:
    """peft keys are ``<module>.<lora tensor>[.weight]``, and ``<module>.lora_B.bias`` for LoRA's bias term
    (lora_bias): a tensor is named from its first ``lora_`` part on; other keys (modules_to_save) by their last."""
    grouped: dict[str, dict[str, tuple]] = {}
    for key in sorted(shapes):
        parts = key.split(".")
        start = next((i for i, part in enumerate(parts) if part.startswith("lora_")), len(parts) - 1)
        name = ".".join(parts[start:]).removesuffix(".weight")  # "lora_A.weight" -> "lora_A"; "weight" stays
        grouped.setdefault(".".join(parts[:start]), {})[name] = shapes[key]
    return grouped


def _single_file_summary(format_name: str, weights: Path) -> AdapterSummary:
    """A kohya or diffusers file: its metadata as the config, tensors grouped by module."""
    shapes = _tensor_shapes(weights)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if format_name == "kohya":
        config = {key: value for key, value in metadata.items() if key.startswith("ss_")}
        suffixes = " ".join(key.partition(".")[2] for key in shapes)
        method = "loha" if "hada_" in suffixes else "lokr" if "lokr_" in suffixes else "lora"
        modules: dict[str, dict[str, tuple]] = {}
        for key in sorted(shapes):
            module, _, tensor = key.partition(".")
            modules.setdefault(module, {})[tensor] = shapes[key]
    else:
        try:
            config = json.loads(metadata.get(METADATA_KEY) or "{}")
        except ValueError:
            config = {}
        method = next((str(v) for k, v in config.items() if k.rsplit(".", 1)[-1] == "peft_type"), "LORA")
        modules = _group_peft_keys(shapes)
    summary = AdapterSummary(weights, format_name, method, config, modules=modules)
    summary.file_bytes = weights.stat().st_size
    return summary


def summarize_adapter(path: str | Path) -> AdapterSummary:
    entry, location = detect_format(Path(path))
    if entry.name == "kohya":
        return _single_file_summary("kohya", kohya_file(location))
    if entry.name == "diffusers":
        return _single_file_summary("diffusers", weights_file(location))
    folder = location.folder
    if (folder / CONFIG_FILE).exists():
        meta = read_json(folder / CONFIG_FILE)
        check_format_fields(meta, folder / CONFIG_FILE)
        weights = folder / WEIGHTS_FILE
        summary = AdapterSummary(folder, "deltatune", str(meta.get("method")), meta.get("config", {}),
                                 model_parameters=meta.get("model_parameters"),
                                 adapter_parameters=meta.get("adapter_parameters"))
        summary.modules = _group_by_module(_tensor_shapes(weights), 1)
        summary.ranks = _allocated_ranks(weights)
    else:
        meta = read_json(folder / PEFT_CONFIG)
        weights = folder / PEFT_WEIGHTS
        summary = AdapterSummary(folder, "peft", str(meta.get("peft_type")), meta)
        shapes = {k.removeprefix("base_model.model."): v for k, v in _tensor_shapes(weights).items()}
        summary.modules = _group_peft_keys(shapes)
    summary.file_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return summary

"""Parsing the merge YAML: mergekit's `models:` syntax, read into a typed `MergeConfig` and validated (paths,
method, parameter names) before any tensor data is touched. Errors name the YAML key. Which value each tensor
gets is `deltatune.merging.config.resolve`.

See `src/deltatune/merging/README.md` for the full format. In short::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 0.5, density: 0.5}
      - model: ./code
        parameters: {weight: [0, 0.5, 1], density: 0.5}   # a gradient over layers
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32          # working dtype: every input is cast to it (needed when inputs' dtypes differ)
    out_dtype: bfloat16     # dtype written (default: the working dtype)
    semantics: mergekit     # deltatune: mergekit (default) or paper — which defaults a method uses
    seed: 0                 # deltatune: seed of the random methods (dare_*, darex)

A parameter value is a number/bool/string, a **gradient** (a list of numbers interpolated linearly over the
layer index, t = layer / (layers − 1); tensors outside the numbered layers use t = 0), or a list of
`{filter: substring, value: ...}` conditions where the first filter contained in the tensor name wins. Per-model
parameters come from the model's `parameters`, then the top-level `parameters`; shared parameters only from the
top level. These are mergekit's rules (0.1.5), applied per tensor by `resolve.ParameterResolver`.

Instead of `models:`, a config may give mergekit's `slices:` (layer stacking; `OutputSlice` / `SliceSource`,
routed by `deltatune.merging.io.slices`)::

    merge_method: passthrough
    slices:
      - sources: [{model: ./a, layer_range: [0, 3]}]      # layers 0-2 of a
      - sources: [{model: ./a, layer_range: [1, 4], parameters: {scale: 0.5}}]
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from deltatune.errors import ConfigError
from deltatune.merging.registry import MergeMethodSpec, merge_method

ALIASES = {"lambda": "scaling", "pcb_ratio": "density"}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
               "fp64": torch.float64}
SUPPORTED_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "semantics",
                  "seed", "tokenizer_source"}
UNSUPPORTED_KEYS = {"modules": "multi-module configs", "tokenizer": "tokenizer merging",
                    "chat_template": "chat templates"}
SLICE_KEYS = {"sources", "parameters", "base_model"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """One source of an output slice: layers [start, end) of one model (mergekit's InputSliceDefinition)."""

    path: Path
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class OutputSlice:
    """One run of output layers, merged from equally long layer ranges of its sources (OutputSliceDefinition).
    base_model: this slice's base (default: the top-level base_model)."""

    sources: tuple[SliceSource, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    base_model: Path | None = None

    @property
    def length(self) -> int:
        return self.sources[0].length


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration (paths resolved, method known, parameter names checked)."""

    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: Path | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    semantics: str = "mergekit"
    seed: int = 0
    source_text: str = ""
    slices: tuple[OutputSlice, ...] = ()  # the `slices:` form; `models` is then empty

    @property
    def method(self) -> MergeMethodSpec:
        return merge_method(self.merge_method)


def parse_dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in DTYPE_NAMES:
        raise ConfigError(f"{key}={value!r} is invalid: expected one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[value.lower()]


def _canonical(parameters: Any, where: str) -> dict[str, Any]:
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise ConfigError(f"{where}: parameters must be a mapping of name: value, got {parameters!r}")
    canonical: dict[str, Any] = {}
    for key, value in parameters.items():
        name = ALIASES.get(str(key), str(key))
        if name in canonical:  # `lambda` and `scaling` together: one would silently win
            raise ConfigError(f"{where}: {key!r} and {name!r} are the same parameter; give only one of them")
        canonical[name] = value
    return canonical


def _resolve_path(reference: Any, config_dir: Path | None, where: str) -> Path:
    if not isinstance(reference, str) or not reference:
        raise ConfigError(f"{where}: expected a local model path, got {reference!r}")
    if "+" in reference or "@" in reference:
        raise ConfigError(f"{where}: {reference!r} uses mergekit's @revision/+lora syntax, which is not "
                          "supported; give a local folder of safetensors weights")
    path = Path(reference).expanduser()
    if not path.is_absolute() and not path.exists() and config_dir is not None and (config_dir / path).exists():
        path = config_dir / path
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError for a symlink loop
        raise ConfigError(f"{where}: {reference!r} is a symbolic link loop; point it at the model folder") from None


def _check_shared_names(spec: MergeMethodSpec, shared: Mapping[str, Any], where: str) -> None:
    shared_names, model_names = spec.field_names()
    for name in shared:
        if name not in shared_names | model_names:
            raise ConfigError(f"{where}: unknown parameter {name!r} for {spec.name}; known: "
                              f"{', '.join(sorted(shared_names | model_names)) or 'none'}")


def _check_model_names(spec: MergeMethodSpec, parameters: Mapping[str, Any], where: str) -> None:
    shared_names, model_names = spec.field_names()
    for name in parameters:
        if name in shared_names and name not in model_names:
            raise ConfigError(f"{where}: {name!r} is a shared parameter of {spec.name}; "
                              "put it under the top-level (or the slice's) parameters")
        if name not in model_names:
            raise ConfigError(f"{where}: unknown parameter {name!r} for {spec.name}; per-model "
                              f"parameters are {', '.join(sorted(model_names)) or 'none'}")


def _check_names(spec: MergeMethodSpec, shared: Mapping[str, Any], models: tuple[ModelEntry, ...]) -> None:
    _check_shared_names(spec, shared, "parameters")
    for index, entry in enumerate(models):
        _check_model_names(spec, entry.parameters, f"models[{index}]")


def _layer_range(raw: Any, where: str) -> tuple[int, int]:
    if (not isinstance(raw, (list, tuple)) or len(raw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)):
        raise ConfigError(f"{where}.layer_range={raw!r} is invalid: expected [start, end], two integers "
                          "(layers start..end-1, as mergekit)")
    start, end = raw
    if not 0 <= start < end:
        raise ConfigError(f"{where}.layer_range={list(raw)!r} is invalid: expected 0 <= start < end "
                          "(the end is exclusive: [0, 4] is layers 0-3)")
    return start, end


def _source(item: Any, at: str, spec: MergeMethodSpec, config_dir: Path | None) -> SliceSource:
    if not isinstance(item, Mapping) or "model" not in item or "layer_range" not in item:
        raise ConfigError(f"{at}: expected {{model: path, layer_range: [start, end]}}, got {item!r}")
    for key in item:
        if key not in SOURCE_KEYS:
            raise ConfigError(f"{at}: unknown key {key!r}; a source takes {', '.join(sorted(SOURCE_KEYS))}")
    parameters = _canonical(item.get("parameters"), at)
    _check_model_names(spec, parameters, at)
    return SliceSource(_resolve_path(item["model"], config_dir, at), _layer_range(item["layer_range"], at), parameters)


def _slice(raw: Any, index: int, spec: MergeMethodSpec, config_dir: Path | None) -> OutputSlice:
    where = f"slices[{index}]"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise ConfigError(f"{where}: expected {{sources: [{{model: path, layer_range: [start, end]}}, ...]}}")
    for key in raw:
        if key not in SLICE_KEYS:  # e.g. mergekit's residual_weight, which mergekit 0.1.5 itself never reads
            raise ConfigError(f"{where}: unknown key {key!r}; a slice takes {', '.join(sorted(SLICE_KEYS))}")
    sources = [_source(item, f"{where}.sources[{number}]", spec, config_dir)
               for number, item in enumerate(raw["sources"])]
    lengths = [source.length for source in sources]
    if len(set(lengths)) > 1:
        raise ConfigError(f"{where}: its sources have {lengths} layers; every source of one slice must give "
                          "the same number of layers (they are merged layer by layer)")
    paths = [source.path for source in sources]
    for number, path in enumerate(paths):
        if path in paths[:number]:  # mergekit refuses it too ("Duplicate merge inputs")
            raise ConfigError(f"{where}.sources[{number}]: model {path} is already a source of this slice; a "
                              "model can give one layer range per slice (use another slice for the other range)")
    parameters = _canonical(raw.get("parameters"), where)
    _check_shared_names(spec, parameters, f"{where}.parameters")
    base = _resolve_path(raw["base_model"], config_dir, f"{where}.base_model") if raw.get("base_model") else None
    return OutputSlice(tuple(sources), parameters, base)


def _slices(raw: Any, spec: MergeMethodSpec, config_dir: Path | None) -> tuple[OutputSlice, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices: expected a non-empty list of {sources: [{model: path, layer_range: [start, "
                          "end]}]} entries")
    return tuple(_slice(item, index, spec, config_dir) for index, item in enumerate(raw))


def _models(raw: Any, config_dir: Path | None) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("models: expected a non-empty list of {model: path, parameters: {...}} entries")
    entries = []
    for index, item in enumerate(raw):
        item = {"model": item} if isinstance(item, str) else item
        if not isinstance(item, Mapping) or "model" not in item:
            raise ConfigError(f"models[{index}]: expected {{model: path, parameters: {{...}}}}, got {item!r}")
        entries.append(ModelEntry(_resolve_path(item["model"], config_dir, f"models[{index}]"),
                                  _canonical(item.get("parameters"), f"models[{index}]")))
    return tuple(entries)


def _refuse_search_blocks(raw: Mapping[str, Any]) -> None:
    from deltatune.merging.search.space import path_name, search_blocks

    found = search_blocks(raw)
    if found:
        path, block = found[0]
        raise ConfigError(f"{path_name(path)} is a search block ({dict(block)}): run `deltatune merge CONFIG "
                          "--search --eval TASK --budget N --out DIR` to choose it, or give a number")


def config_from_dict(raw: Mapping[str, Any], config_dir: Path | None = None, source_text: str = "") -> MergeConfig:
    """Validate a parsed YAML mapping into a MergeConfig (one-line ConfigError on any problem)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("the merge config must be a YAML mapping with merge_method, models, ...")
    _refuse_search_blocks(raw)
    for key in raw:
        if key in UNSUPPORTED_KEYS:
            raise ConfigError(f"{key}: {UNSUPPORTED_KEYS[key]} are not supported yet; use the models: or slices: "
                              "syntax")
        if key not in SUPPORTED_KEYS:
            raise ConfigError(f"unknown top-level key {key!r}; expected some of {', '.join(sorted(SUPPORTED_KEYS))}")
    if "merge_method" not in raw:
        raise ConfigError("merge_method is missing; e.g. merge_method: ties (see `deltatune merge --list-methods`)")
    spec = merge_method(str(raw["merge_method"]))
    semantics = raw.get("semantics", "mergekit")
    if semantics not in ("mergekit", "paper"):
        raise ConfigError(f"semantics={semantics!r} is invalid: expected mergekit or paper")
    if raw.get("tokenizer_source") not in (None, "base"):
        raise ConfigError("tokenizer_source: only 'base' (copy the base model's tokenizer files) is supported")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} is invalid: expected an integer >= 0")
    if ("models" in raw) == ("slices" in raw):
        raise ConfigError("give exactly one of models: (merge whole models) or slices: (stack or merge layer "
                          "ranges), as mergekit")
    slices = _slices(raw["slices"], spec, config_dir) if "slices" in raw else ()
    models = _models(raw["models"], config_dir) if "models" in raw else ()
    base = _resolve_path(raw["base_model"], config_dir, "base_model") if raw.get("base_model") else None
    parameters = _canonical(raw.get("parameters"), "parameters")
    _check_names(spec, parameters, models)
    return MergeConfig(spec.name, models, base, parameters, parse_dtype(raw.get("dtype"), "dtype"),
                       parse_dtype(raw.get("out_dtype"), "out_dtype"), semantics, seed, source_text, slices)


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file."""
    raw, text, folder = read_config_yaml(path)
    return config_from_dict(raw, folder, text)


def read_config_yaml(path: str | Path) -> tuple[Any, str, Path]:
    """(parsed YAML, its text, its folder) of a merge config file, unvalidated (one-line ConfigError if unreadable)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"merge config {path} does not exist; check the path") from None
    except OSError as error:
        raise ConfigError(f"cannot read merge config {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"merge config {path} is not UTF-8 text; save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax") from None
    return raw, text, path.parent.resolve()

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
SUPPORTED_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "semantics", "seed",
                  "tokenizer_source"}
UNSUPPORTED_KEYS = {"slices": "layer slices (frankenmerges)", "modules": "multi-module configs",
                    "tokenizer": "tokenizer merging", "chat_template": "chat templates"}


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    parameters: Mapping[str, Any] = field(default_factory=dict)


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


def _check_names(spec: MergeMethodSpec, shared: Mapping[str, Any], models: tuple[ModelEntry, ...]) -> None:
    shared_names, model_names = spec.field_names()
    for name in shared:
        if name not in shared_names | model_names:
            raise ConfigError(f"parameters: unknown parameter {name!r} for {spec.name}; known: "
                              f"{', '.join(sorted(shared_names | model_names))}")
    for index, entry in enumerate(models):
        for name in entry.parameters:
            if name in shared_names and name not in model_names:
                raise ConfigError(f"models[{index}]: {name!r} is a shared parameter of {spec.name}; "
                                  "put it under the top-level parameters")
            if name not in model_names:
                raise ConfigError(f"models[{index}]: unknown parameter {name!r} for {spec.name}; per-model "
                                  f"parameters are {', '.join(sorted(model_names))}")


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


def config_from_dict(raw: Mapping[str, Any], config_dir: Path | None = None, source_text: str = "") -> MergeConfig:
    """Validate a parsed YAML mapping into a MergeConfig (one-line ConfigError on any problem)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("the merge config must be a YAML mapping with merge_method, models, ...")
    for key in raw:
        if key in UNSUPPORTED_KEYS:
            raise ConfigError(f"{key}: {UNSUPPORTED_KEYS[key]} are not supported yet; use the models: syntax")
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
    models = _models(raw.get("models"), config_dir)
    base = _resolve_path(raw["base_model"], config_dir, "base_model") if raw.get("base_model") else None
    parameters = _canonical(raw.get("parameters"), "parameters")
    _check_names(spec, parameters, models)
    return MergeConfig(spec.name, models, base, parameters, parse_dtype(raw.get("dtype"), "dtype"),
                       parse_dtype(raw.get("out_dtype"), "out_dtype"), semantics, seed, source_text)


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file."""
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
    return config_from_dict(raw, path.parent.resolve(), text)

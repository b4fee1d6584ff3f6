"""The merge YAML: mergekit's `models:` syntax, read and validated before any tensor data is touched.

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
top level. These are mergekit's rules (0.1.5).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from deltatune.errors import ConfigError, MergeError
from deltatune.merging.registry import MergeMethodSpec, merge_method

ALIASES = {"lambda": "scaling", "pcb_ratio": "density"}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
               "fp64": torch.float64}
SUPPORTED_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "semantics", "seed",
                  "tokenizer_source"}
UNSUPPORTED_KEYS = {"slices": "layer slices (frankenmerges)", "modules": "multi-module configs",
                    "tokenizer": "tokenizer merging", "chat_template": "chat templates"}
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


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
    return {ALIASES.get(str(key), str(key)): value for key, value in parameters.items()}


def _resolve_path(reference: Any, config_dir: Path | None, where: str) -> Path:
    if not isinstance(reference, str) or not reference:
        raise ConfigError(f"{where}: expected a local model path, got {reference!r}")
    if "+" in reference or "@" in reference:
        raise ConfigError(f"{where}: {reference!r} uses mergekit's @revision/+lora syntax, which is not "
                          "supported; give a local folder of safetensors weights")
    path = Path(reference).expanduser()
    if not path.is_absolute() and not path.exists() and config_dir is not None and (config_dir / path).exists():
        path = config_dir / path
    return path.resolve()


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
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax") from None
    return config_from_dict(raw, path.parent.resolve(), text)


def layer_position(name: str, layer_count: int | None) -> float:
    """mergekit's t: layer / (layers − 1) for tensors in numbered layers, 0 elsewhere (1 for a single layer)."""
    match = LAYER_PATTERN.search(name)
    if match is None or not layer_count:
        return 0.0
    return int(match.group(1)) / (layer_count - 1) if layer_count > 1 else 1.0


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve a scalar, a gradient, or a list of {filter, value} conditions for one tensor (mergekit rules)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(item, Mapping) for item in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    for condition in setting:
        if not isinstance(condition, Mapping) or "value" not in condition:
            raise ConfigError(f"parameter condition {condition!r}: expected {{filter: substring, value: ...}}")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(condition["value"], tensor_name, t)
    return None


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"{where}: {error}") from None


class ParameterResolver:
    """Per-tensor parameter dataclasses for a config: shared params and one per-model params object per model."""

    def __init__(self, config: MergeConfig, layer_count: int | None) -> None:
        self.config, self.spec, self.layer_count = config, config.method, layer_count
        self.shared_names, self.model_names = self.spec.field_names()
        self._cache: dict[str, Any] = {}

    def _value(self, name: str, settings: list[Mapping[str, Any]], tensor: str, t: float) -> Any:
        for scope in settings:
            if name in scope:
                value = evaluate_setting(scope[name], tensor, t)
                if value is not None:
                    return self._translate(name, value)
        if self.config.semantics == "mergekit" and name in self.spec.mergekit_defaults:
            return self.spec.mergekit_defaults[name]
        return dataclasses.MISSING

    def _translate(self, name: str, value: Any) -> Any:
        mapping = self.spec.mergekit_values.get(name, {}) if self.config.semantics == "mergekit" else {}
        return mapping.get(value, value) if isinstance(value, (bool, str, int, float)) else value

    def _values(self, names: set[str], settings: list[Mapping[str, Any]], tensor: str, t: float) -> dict:
        values = {name: self._value(name, settings, tensor, t) for name in sorted(names)}
        return {name: value for name, value in values.items() if value is not dataclasses.MISSING}

    def resolve(self, tensor: str) -> tuple[Any, list[Any]]:
        """(shared params, [per-model params]) for one tensor name, validated by the method's dataclasses."""
        t = layer_position(tensor, self.layer_count)
        shared = self._values(self.shared_names, [self.config.parameters], tensor, t)
        per_model = [self._values(self.model_names, [entry.parameters, self.config.parameters], tensor, t)
                     for entry in self.config.models]
        key = repr((sorted(shared.items()), [sorted(m.items()) for m in per_model]))
        if key not in self._cache:
            params = _build(self.spec.params_cls, shared, f"tensor {tensor!r}")
            models = [_build(self.spec.model_params_cls, values, f"models[{i}] tensor {tensor!r}")
                      for i, values in enumerate(per_model)]
            if self.spec.check is not None:
                try:
                    self.spec.check(params, models)
                except MergeError as error:
                    raise MergeError(f"tensor {tensor!r}: {error}") from None
            self._cache[key] = (params, models)
        return self._cache[key]

"""Resolving a parsed merge config for one tensor: the method's parameter dataclasses for that tensor name.

mergekit's rules (0.1.5): a setting is a scalar, a **gradient** (numbers interpolated linearly over the layer
index, t = layer / (layers − 1); tensors outside the numbered layers use t = 0) or a list of
`{filter: substring, value: ...}` conditions where the first filter contained in the tensor name wins. Per-model
parameters come from the model's `parameters`, then the top-level `parameters`; shared parameters only from the
top level. Under `semantics: mergekit` the method's `mergekit_defaults` and `mergekit_values` apply.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from deltatune.errors import ConfigError, MergeError
from deltatune.merging.config.parse import MergeConfig

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


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
        top = self.config.parameters
        per_model = [(tensor, [entry.parameters, top]) for entry in self.config.models]
        return self.resolve_scopes(tensor, [top], per_model, t)

    def resolve_scopes(self, tensor: str, shared_scopes: Sequence[Mapping[str, Any]],
                       model_scopes: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                       t: float) -> tuple[Any, list[Any]]:
        """The same, with the settings given explicitly, highest precedence first: the shared scopes, and per model
        (the model's own tensor name, which its filters see; its scopes). The `slices:` form uses this (a slice's
        sources, then the slice, then the top level), with t counted within the slice."""
        shared = self._values(self.shared_names, list(shared_scopes), tensor, t)
        per_model = [self._values(self.model_names, list(scopes), name, t) for name, scopes in model_scopes]
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

"""Which merge settings a search may change: `{search: [low, high]}` blocks inside a merge config's parameters.

A search block stands where a number would, anywhere under a `parameters:` mapping (the top level, a model's, a
slice's or a source's, also as a filter's `value`)::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: {search: [0.5, 1.5]}}    # a dimension of its own: models[0].parameters.weight
      - model: ./code
    parameters:
      density: {search: [0.1, 0.9]}                   # top-level: the default of every model, one dimension
      lambda: {search: [0.2, 2.0]}

Each block is one continuous dimension, named by its path in the config (`parameters.lambda`). `config_at`
puts a setting (a number per dimension) into a copy of the raw config; the raw config itself is never changed.
The same dimensions can be given on the command line (`--search lambda=0.2:2.0`), see `dimension_from_option`.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deltatune.errors import ConfigError

SEARCH_KEY = "search"
PathKey = str | int


@dataclass(frozen=True)
class Dimension:
    """One searched number: where it sits in the raw config (`path`), and its range [low, high]."""

    path: tuple[PathKey, ...]
    low: float
    high: float

    @property
    def name(self) -> str:
        return path_name(self.path)

    def value_at(self, unit: float) -> float:
        """The value at position `unit` in [0, 1] of the range (clipped to the range)."""
        return self.low + min(max(unit, 0.0), 1.0) * (self.high - self.low)


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions a merge search explores; a setting is `{dimension name: value}`."""

    dimensions: tuple[Dimension, ...]

    def __post_init__(self) -> None:
        names = [d.name for d in self.dimensions]
        if not names:
            raise ConfigError("the search space is empty: put {search: [low, high]} where a parameter's number "
                              "goes (e.g. parameters: {lambda: {search: [0.2, 2.0]}}) or pass --search "
                              "lambda=0.2:2.0")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"search dimension {duplicates[0]} is given twice; give each parameter one range")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def setting_at(self, units: Sequence[float]) -> dict[str, float]:
        """The setting at a point of the unit cube [0, 1]^d (the coordinates the optimiser works in)."""
        return {d.name: d.value_at(float(u)) for d, u in zip(self.dimensions, units)}

    def centre(self) -> dict[str, float]:
        return self.setting_at([0.5] * len(self.dimensions))

    def check_setting(self, setting: Mapping[str, float]) -> None:
        """Refuse a setting that misses a dimension, names an unknown one, or leaves a range."""
        unknown = sorted(set(setting) - set(self.names))
        if unknown:
            raise ConfigError(f"setting names {unknown[0]!r}, which is not a search dimension; known: "
                              f"{', '.join(self.names)}")
        for dimension in self.dimensions:
            if dimension.name not in setting:
                raise ConfigError(f"setting misses the search dimension {dimension.name}")
            value = setting[dimension.name]
            if not dimension.low <= value <= dimension.high:
                raise ConfigError(f"{dimension.name}={value!r} is outside its search range "
                                  f"[{dimension.low}, {dimension.high}]")

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> SearchSpace:
        """Every `{search: [low, high]}` block of a raw (YAML-parsed) merge config, in document order."""
        return cls(tuple(_dimension(path, block) for path, block in search_blocks(raw)))


def path_name(path: Sequence[PathKey]) -> str:
    """('models', 0, 'parameters', 'weight') -> 'models[0].parameters.weight'."""
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def is_search_block(value: Any) -> bool:
    return isinstance(value, Mapping) and SEARCH_KEY in value


def search_blocks(node: Any, path: tuple[PathKey, ...] = ()) -> list[tuple[tuple[PathKey, ...], Any]]:
    """(path, block) of every search block under `node`, depth first in document order."""
    if is_search_block(node):
        return [(path, node)]
    if isinstance(node, Mapping):
        return [found for key, value in node.items() for found in search_blocks(value, (*path, str(key)))]
    if isinstance(node, list):
        return [found for index, value in enumerate(node) for found in search_blocks(value, (*path, index))]
    return []


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dimension(path: tuple[PathKey, ...], block: Mapping[str, Any]) -> Dimension:
    name = path_name(path)
    if "parameters" not in path:
        raise ConfigError(f"{name}: a search block may only stand under a parameters: mapping (a merge "
                          "parameter's number), not for a path, method or dtype")
    extra = sorted(set(block) - {SEARCH_KEY})
    if extra:
        raise ConfigError(f"{name}: unknown key {extra[0]!r} in a search block; write {{search: [low, high]}}")
    bounds = block[SEARCH_KEY]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_number(v) for v in bounds)):
        raise ConfigError(f"{name}: search={bounds!r} is invalid: expected [low, high], two numbers "
                          "(a continuous range; e.g. {search: [0.1, 0.9]})")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise ConfigError(f"{name}: search=[{low}, {high}] is invalid: expected low < high")
    return Dimension(path, low, high)


def config_at(raw: Mapping[str, Any], setting: Mapping[str, float]) -> dict[str, Any]:
    """A deep copy of the raw config with every search block replaced by the setting's value (`raw` is kept)."""
    result = copy.deepcopy(dict(raw))
    space = SearchSpace.from_config(result)
    space.check_setting(setting)
    for dimension in space.dimensions:
        parent = result
        for key in dimension.path[:-1]:
            parent = parent[key]
        parent[dimension.path[-1]] = float(setting[dimension.name])
    return result


_OPTION = re.compile(r"^\s*(?P<name>[^=]+?)\s*=\s*(?P<low>[^:]+?)\s*:\s*(?P<high>[^:]+?)\s*$")
_MODEL = re.compile(r"^models\[(?P<index>\d+)\]\.(?:parameters\.)?(?P<name>\w+)$")


def _option_path(name: str, raw: Mapping[str, Any], option: str) -> tuple[PathKey, ...]:
    model = _MODEL.match(name)
    if model is not None:
        index = int(model.group("index"))
        models = raw.get("models")
        if not isinstance(models, list) or index >= len(models):
            count = len(models) if isinstance(models, list) else 0
            raise ConfigError(f"--search {option}: the config has {count} models: entries, so there is no "
                              f"models[{index}]")
        return ("models", index, "parameters", model.group("name"))
    if re.fullmatch(r"(?:parameters\.)?\w+", name):
        return ("parameters", name.removeprefix("parameters."))
    raise ConfigError(f"--search {option}: expected NAME=LOW:HIGH with NAME a top-level parameter (lambda, "
                      "density, ...) or models[I].NAME")


def add_search_options(raw: Mapping[str, Any], options: Sequence[str]) -> dict[str, Any]:
    """A copy of `raw` with `NAME=LOW:HIGH` command-line dimensions written in as search blocks."""
    result = copy.deepcopy(dict(raw))
    for option in options:
        match = _OPTION.match(option)
        if match is None:
            raise ConfigError(f"--search {option!r}: expected NAME=LOW:HIGH, e.g. lambda=0.2:2.0 or "
                              "models[0].weight=0.5:1.5")
        try:
            low, high = float(match.group("low")), float(match.group("high"))
        except ValueError:
            raise ConfigError(f"--search {option!r}: LOW and HIGH must be numbers, e.g. lambda=0.2:2.0") from None
        path = _option_path(match.group("name"), result, option)
        if path[0] == "models" and isinstance(result["models"][path[1]], str):  # the `- ./model` short form
            result["models"][path[1]] = {"model": result["models"][path[1]]}
        parent: Any = result
        for key in path[:-1]:
            if isinstance(key, str) and parent.get(key) is None:  # no parameters: mapping yet
                parent[key] = {}
            parent = parent[key]
        if is_search_block(parent.get(path[-1])):
            raise ConfigError(f"--search {option}: {path_name(path)} already has a search block in the config; "
                              "give its range in one place")
        parent[path[-1]] = {SEARCH_KEY: [low, high]}
    return result

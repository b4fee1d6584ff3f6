"""Merge-method registry: one decorator turns a function on one tensor group into a named merge method.

A method file defines two frozen dataclasses — the method's shared parameters and its per-model parameters,
both with paper defaults and validated in `__post_init__` — and one function `(MergeInputs) -> Tensor`, then
registers it::

    @register_merge("ties", TiesParams, TaskModelParams, base="required",
                    mergekit_defaults={"density": 1.0, ...}, self_merge={"density": 1.0})
    def _merge(inputs: MergeInputs) -> Tensor: ...

Besides its parameters, a method declares what the shared contract test may expect of it: `stochastic` (the
seed matters) and `self_merge` (the settings under which merging a model with itself is the identity).

The streaming layer (`deltatune.merging.io.stream`) calls that function once per output tensor. `mergekit_defaults`
are the defaults mergekit 0.1.5 uses for the same method name; they apply when a mergekit-style YAML is read
(the default `semantics: mergekit`), so a config ported from mergekit gives mergekit's result.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deltatune.errors import ConfigError

BASE_POLICIES = ("required", "optional", "unused")


@dataclass
class MergeInputs:
    """Everything a merge method sees for one output tensor.

    tensors: one tensor per contributing (non-base) model, in config order, already in the working dtype.
    owned: True when the caller hands the tensors over, so the method may overwrite them in place (the
    streaming layer does this to keep memory at a few tensors).
    generator: seeded generator for model `index` on this tensor (deterministic, order-independent).
    statistics: whole-model statistics, for methods run with a model-wide scope (see `ModelStatistic`).
    """

    name: str
    base: Tensor | None
    tensors: list[Tensor]
    model_params: Sequence[Any]
    params: Any
    generator: Callable[[int], torch.Generator] = field(default=lambda index: torch.Generator().manual_seed(index))
    owned: bool = False
    statistics: Mapping[str, Sequence[Sequence[float]]] = field(default_factory=dict)


def tensor_generators(seed: int, name: str) -> Callable[[int], torch.Generator]:
    """`MergeInputs.generator` for one tensor: model i's generator is seeded by a hash of (seed, tensor name, i),
    so random methods are reproducible and independent of shard layout and processing order, and the
    streaming and in-memory merges draw the same masks."""
    def generator(index: int) -> torch.Generator:
        digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


@dataclass(frozen=True)
class ModelStatistic:
    """Whole-model order statistics a method needs before merging (e.g. the TIES paper's global top-k cut).

    score(inputs, statistics_so_far) returns one score tensor per model for one tensor group; the streaming
    layer computes, per model i, the r-th largest score over the whole model for every r in
    `ranks(total_count, i)` (exactly, in two histogram passes), and stores the values as
    `statistics[key][i]` (a tuple, one value per rank) before the next statistic or the merge runs.
    """

    key: str
    score: Callable[[MergeInputs, Mapping[str, Sequence[Sequence[float]]]], list[Tensor]]
    ranks: Callable[[int, int], Sequence[int]]


@dataclass(frozen=True)
class MergeMethodSpec:
    name: str
    params_cls: type
    model_params_cls: type
    merge: Callable[[MergeInputs], Tensor]
    base: str
    description: str
    mergekit_defaults: Mapping[str, Any]
    min_models: int = 1
    statistics: Callable[[Any, Sequence[Any]], Sequence[ModelStatistic]] | None = None
    check: Callable[[Any, list[Any]], None] | None = None
    mergekit_values: Mapping[str, Mapping[Any, Any]] = field(default_factory=dict)
    stochastic: bool = False
    self_merge: Mapping[str, Any] | None = None
    max_models: int | None = None  # None: any number of models (SLERP interpolates between exactly one and the base)

    def field_names(self) -> tuple[set[str], set[str]]:
        """(shared parameter names, per-model parameter names)."""
        return ({f.name for f in dataclasses.fields(self.params_cls)},
                {f.name for f in dataclasses.fields(self.model_params_cls)})


_MERGES: dict[str, MergeMethodSpec] = {}


def register_merge(name: str, params_cls: type, model_params_cls: type, *, base: str = "required",
                   mergekit_defaults: Mapping[str, Any] | None = None, min_models: int = 1,
                   statistics: Callable[[Any, Sequence[Any]], Sequence[ModelStatistic]] | None = None,
                   check: Callable[[Any, list[Any]], None] | None = None,
                   mergekit_values: Mapping[str, Mapping[Any, Any]] | None = None, description: str = "",
                   stochastic: bool = False, self_merge: Mapping[str, Any] | None = None,
                   max_models: int | None = None):
    """Function decorator registering a merge method under `name` (see the module docstring).

    check(params, model_params): raises MergeError for combinations no single field can reject (e.g. weights
    that must not sum to 0); run for every output tensor before any tensor data is read.
    mergekit_values: per-parameter value translations applied to a mergekit-style YAML (e.g. DARE's
    `rescale: true` means L1-norm matching in mergekit).
    stochastic: the method draws from `MergeInputs.generator`, so the seed changes its output.
    max_models: the most models (besides the base) the method takes; its `check` refuses more by name.
    self_merge: parameter values (shared or per-model, by field name) under which merging copies of one
    fine-tune, with weights summing to 1, gives that fine-tune back; None when no setting does (the method
    always drops or rescales something). The contract test (tests/merging/test_contract.py) checks both.
    """
    if base not in BASE_POLICIES:
        raise ConfigError(f"base={base!r}: expected one of {BASE_POLICIES}")

    def decorate(function: Callable[[MergeInputs], Tensor]) -> Callable[[MergeInputs], Tensor]:
        if name in _MERGES and _MERGES[name].merge is not function:
            raise ConfigError(f"merge method {name!r} is registered twice")
        summary = description or (function.__doc__ or "").strip().splitlines()[0]
        _MERGES[name] = MergeMethodSpec(name, params_cls, model_params_cls, function, base, summary,
                                        dict(mergekit_defaults or {}), min_models, statistics, check,
                                        dict(mergekit_values or {}), stochastic,
                                        None if self_merge is None else dict(self_merge), max_models)
        return function

    return decorate


def _import_builtin_merges() -> None:
    import deltatune.merging.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def merge_method(name: str) -> MergeMethodSpec:
    """The registered merge method `name`, or a ConfigError listing the known names."""
    _import_builtin_merges()
    if name not in _MERGES:
        close = difflib.get_close_matches(name, list(_MERGES), n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown merge_method {name!r}; known: {', '.join(sorted(_MERGES))}.{hint}")
    return _MERGES[name]


def list_merge_methods() -> list[MergeMethodSpec]:
    """Every registered merge method, sorted by name."""
    _import_builtin_merges()
    return [_MERGES[name] for name in sorted(_MERGES)]

"""The base of every method's config: which modules to adapt, which extra modules to train, and (de)serialization."""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from deltatune.errors import ConfigError, config_check

ALL_LINEAR = "all-linear"
C = TypeVar("C", bound="DeltaConfig")


@dataclass(frozen=True)
class DeltaConfig:
    """Targeting fields shared by every method. Subclasses add their hyper-parameters (all with defaults).

    Args:
        targets: which modules to adapt. A list of names matches a module whose dotted path equals a name or
            ends with ``"." + name`` (``["query", "value"]``); a single string other than ``"all-linear"`` is a
            regular expression that must match the whole dotted path; ``"all-linear"`` selects every Linear and
            transformers Conv1D except the model's output head and ``extra_trainable`` modules; ``None`` selects
            every layer of the types in ``layer_types`` except the output head (name the head to adapt it).
        layer_types: keep only layers of these kinds (``"linear"``, ``"conv"``, ``"embedding"``,
            ``"conv1d_hf"``) or class names (``"Conv2d"``); empty = no filter.
        exclude: module names (suffix match, as ``targets``) never adapted.
        extra_trainable: modules trained and saved with the adapter although they get no delta (a
            classifier head, say); matched by suffix like ``targets``.
        untie: a target that shares a parameter with another module (GPT-2's ``lm_head`` and
            ``transformer.wte``) is refused unless this is True; then the target gets its own copy of the shared
            parameter before the delta is attached, so training and merging change the target only (the model
            then holds one more weight-sized tensor).
    """

    method: ClassVar[str] = ""
    targets: str | tuple[str, ...] | None = ALL_LINEAR
    layer_types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    extra_trainable: tuple[str, ...] = ()
    untie: bool = False

    def __post_init__(self) -> None:
        config_check(isinstance(self.untie, bool), "untie", self.untie, "True or False")
        for name in ("layer_types", "exclude", "extra_trainable"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        if self.targets is not None and not isinstance(self.targets, str):
            object.__setattr__(self, "targets", _as_tuple(self.targets, "targets"))
            config_check(len(self.targets) > 0, "targets", list(self.targets), "a non-empty list of module names",
                         'use targets="all-linear" or targets=None with layer_types')
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            try:
                re.compile(self.targets)
            except re.error as error:
                raise ConfigError(f"targets={self.targets!r} is not a valid regular expression: {error}") from None

    def plan(self, model: Any, batches: Any, loss_fn: Any = None) -> DeltaConfig:
        """The config to adapt `model` with, for methods that choose what to train from data before training
        (SPT's sensitivity); `batches` is an iterable of training batches, read only as far as the method needs;
        `loss_fn(outputs, labels)` is the training loss, as the Trainer takes it (None: the Trainer's default).
        Methods without such a stage return themselves."""
        return self

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        """Trainer callbacks this method needs (allocators, schedules), built for a run of `total_steps`.
        Methods without a training-time schedule return none."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists)."""
        data = dataclasses.asdict(self)
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config from `to_dict` output; unknown fields are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)


def _as_tuple(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Sequence) and not isinstance(value, (set, frozenset)):
        raise ConfigError(f"{name}={value!r} is invalid: expected a list of strings")
    return tuple(value)

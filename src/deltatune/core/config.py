"""The base of every method's config: which modules to adapt, which extra modules to train, and (de)serialization."""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from deltatune.core.fields import Mismatch, conform, describe, field_hints, parse_text
from deltatune.errors import ConfigError, config_check

ALL_LINEAR = "all-linear"
REGEX_PREFIX = "re:"  # `-p targets=re:PATTERN` gives a regular expression on the command line
_REGEX_SIGNS = set("*+?[](){}|^$\\")
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
    # The field that sets how many numbers the method trains (rank, fraction, ...), or None when nothing does
    # (BitFit trains every bias). Budget matching (benchmarks/leaderboard.py) varies this field alone.
    budget_field: ClassVar[str | None] = None
    targets: str | tuple[str, ...] | None = ALL_LINEAR
    layer_types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    extra_trainable: tuple[str, ...] = ()
    untie: bool = False

    def __post_init__(self) -> None:
        config_check(isinstance(self.untie, bool), "untie", self.untie, "True or False")
        for name in ("layer_types", "exclude", "extra_trainable"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        self._conform_fields()
        if self.targets is not None and not isinstance(self.targets, str):
            object.__setattr__(self, "targets", _as_tuple(self.targets, "targets"))
            config_check(len(self.targets) > 0, "targets", list(self.targets), "a non-empty list of module names",
                         'use targets="all-linear" or targets=None with layer_types')
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            try:
                re.compile(self.targets)
            except re.error as error:
                raise ConfigError(f"targets={self.targets!r} is not a valid regular expression: {error}") from None

    def _conform_fields(self) -> None:
        """Every field against its type hint, before any method's range checks compare or compute with it:
        `alpha="16"`, `rank="four"`, `rslora="no"`, `alpha=inf` are refused by name (an int is a fine float)."""
        hints = field_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                fitted = conform(value, hints[f.name])
            except Mismatch as mismatch:
                raise ConfigError(
                    f"{type(self).__name__}.{f.name}={value!r} is invalid: expected {mismatch}, got {_kind_of(value)}"
                    + _type_fix(value, hints[f.name], f.name)
                ) from None
            if fitted is not value:
                object.__setattr__(self, f.name, fitted)

    @classmethod
    def parse_field(cls, name: str, text: str) -> Any:
        """Command-line text (`-p name=text`) as a value of field `name`, read by the field's type hint.

        `targets` reads a comma-separated list of module names (`query,value`), `all-linear`, `none`, or
        `re:PATTERN` for a regular expression; other fields read `none`, true/false, numbers, comma lists,
        JSON mappings or plain text as their hint allows."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if name not in fields:
            raise ConfigError(f"{cls.__name__} has no field {name!r}; known fields: {sorted(fields)}")
        if name == "targets":
            return _parse_targets(text)
        hint = field_hints(cls)[name]
        try:
            return parse_text(text, hint)
        except Mismatch:
            raise ConfigError(f"{name}={text!r} is invalid: expected {describe(hint)}") from None

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
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} config must be a JSON object of field values, got {_kind_of(data)}")
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


def _kind_of(value: Any) -> str:
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _type_fix(value: Any, hint: Any, name: str) -> str:
    """The fix for a mistyped value: text that reads as the right type was quoted by mistake."""
    if isinstance(value, str):
        try:
            return f"; write it unquoted: {name}={json.dumps(parse_text(value, hint))}"
        except (Mismatch, TypeError):
            pass
    return f"; give {name} as {describe(hint)}"


def _parse_targets(text: str) -> str | tuple[str, ...] | None:
    """`query,value` -> module names; `re:PATTERN` -> a regular expression; `all-linear`; `none`."""
    if text.strip().lower() in ("none", "null"):
        return None
    if text.startswith(REGEX_PREFIX):
        return text[len(REGEX_PREFIX):]
    if text == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    signs = [name for name in names if _REGEX_SIGNS & set(name)]
    if signs:
        raise ConfigError(f"targets={text!r}: {signs[0]!r} is not a module name; for a regular expression "
                          f"write targets={REGEX_PREFIX}{text}")
    config_check(len(names) > 0, "targets", text, "module names separated by commas, all-linear, none or re:PATTERN")
    return names

"""Config values checked and parsed by the dataclass fields' type hints, the same way for every method.

`conform` checks a value against a field's hint (``int``, ``float``, ``bool``, ``str``, ``tuple[str, ...]``,
``dict[str, int]``, unions with ``None`` ...) and returns it in the field's own form (a JSON list becomes a
tuple). `parse_text` turns command-line text (``-p KEY=VALUE``) into a value of the hint. Both raise `Mismatch`
with a description of what was expected; `DeltaConfig` turns it into a ConfigError naming the field.
"""
from __future__ import annotations

import collections.abc
import functools
import json
import math
import types
import typing
from typing import Any, Literal, Union

NONE_WORDS = ("none", "null")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
FLOAT32_MAX = 3.4028234663852886e38


class Mismatch(Exception):
    """A value that does not fit a field's type hint; the message describes what was expected."""


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass (cached: resolving string annotations is slow)."""
    return typing.get_type_hints(cls)


def _union_options(hint: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return None


def describe(hint: Any) -> str:
    """A reader's name for a hint: ``int | None`` -> "an integer or None"."""
    options = _union_options(hint)
    if options is not None:
        return " or ".join(describe(option) for option in options)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple or origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a finite number within float32's range", str: "a string",
             type(None): "None"}
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _plural(hint: Any) -> str:
    plurals = {int: "integers", float: "finite numbers", str: "strings", bool: "booleans"}
    return plurals.get(hint, describe(hint))


def conform(value: Any, hint: Any) -> Any:
    """`value` in the form of `hint` (lists become tuples for tuple hints), or raise Mismatch."""
    options = _union_options(hint)
    if options is not None:
        for option in options:
            try:
                return conform(value, option)
            except Mismatch:
                continue
        raise Mismatch(describe(hint))
    origin = typing.get_origin(hint)
    if origin is not None:
        return _conform_generic(value, hint, origin, typing.get_args(hint))
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise Mismatch(describe(hint))
    return _conform_scalar(value, hint)


def _conform_scalar(value: Any, hint: Any) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:  # an integer is a fine float; a bool is not a number a user meant
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _fits_float32(value)
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:  # a hint form this checker does not know (a TypeVar, a forward reference): the method checks it
        ok = True
    if not ok:
        raise Mismatch(describe(hint))
    return value


def _fits_float32(value: int | float) -> bool:
    """Finite and at most float32's largest value: a larger scale (alpha=1e39, or an integer too large for a
    float at all) overflows to inf in float32 tensor math, or makes torch refuse it as a scalar mid-forward."""
    try:
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    except OverflowError:
        return False


def _conform_generic(value: Any, hint: Any, origin: Any, args: tuple[Any, ...]) -> Any:
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise Mismatch(describe(hint))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise Mismatch(describe(hint))
        item = args[0] if args else Any
        items = [conform(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, collections.abc.Mapping):
            raise Mismatch(describe(hint))
        key_hint, value_hint = args if args else (Any, Any)
        try:
            for key, item in value.items():
                conform(key, key_hint)
                conform(item, value_hint)
        except Mismatch:
            raise Mismatch(describe(hint)) from None
        return value
    if isinstance(origin, type) and not isinstance(value, origin):
        raise Mismatch(describe(hint))
    return value


def parse_text(text: str, hint: Any) -> Any:
    """Command-line text as a value of `hint`: the first reading the hint allows, in the order None, bool,
    int, float, list (comma-separated), mapping (JSON), string. Raises Mismatch when no reading fits."""
    options = _union_options(hint) or (hint,)
    for reader in (_read_none, _read_bool, _read_int, _read_float, _read_list, _read_mapping, _read_str):
        for option in options:
            try:
                return reader(text, option)
            except Mismatch:
                continue
    raise Mismatch(describe(hint))


def _read_none(text: str, hint: Any) -> None:
    if hint is type(None) and text.strip().lower() in NONE_WORDS:
        return None
    raise Mismatch


def _read_bool(text: str, hint: Any) -> bool:
    word = text.strip().lower()
    if hint is bool and word in TRUE_WORDS + FALSE_WORDS:
        return word in TRUE_WORDS
    raise Mismatch


def _read_int(text: str, hint: Any) -> int:
    if hint is int:
        try:
            return int(text.strip())
        except ValueError:
            pass
    raise Mismatch


def _read_float(text: str, hint: Any) -> float:
    if hint is float:
        try:
            return float(text.strip())
        except ValueError:
            pass
    raise Mismatch


def _read_list(text: str, hint: Any) -> tuple | list:
    origin = typing.get_origin(hint)
    if origin not in (tuple, list):
        raise Mismatch
    item = typing.get_args(hint)[0] if typing.get_args(hint) else str
    values = [parse_text(part, item) for part in text.split(",") if part.strip()]
    return tuple(values) if origin is tuple else values


def _read_mapping(text: str, hint: Any) -> dict:
    if typing.get_origin(hint) not in (dict, collections.abc.Mapping):
        raise Mismatch
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise Mismatch from None
    return conform(value, hint)


def _read_str(text: str, hint: Any) -> str:
    if hint is str or (typing.get_origin(hint) is Literal and text in typing.get_args(hint)):
        return text
    raise Mismatch

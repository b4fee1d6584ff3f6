"""Checks that the merge methods' parameter dataclasses share: field types, and model weights that must not
cancel out or must sum to 1."""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Sequence

from deltatune.errors import MergeError, config_check

_EXPECTED = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}


def _accepts(kind: type, value: object) -> bool:
    """bool is an int to Python, but `weight: true` in a YAML is a mistake, not the number 1."""
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, kind)


def _allowed_types(hint: object) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for t in typing.get_args(hint) if isinstance(t, type))
    return (hint,) if isinstance(hint, type) else ()


def check_field_types(params: object) -> None:
    """ConfigError naming the first field of a params dataclass whose value does not have the annotated type
    (floats must also be finite). Call it first in `__post_init__`; range checks follow in the method file."""
    hints = typing.get_type_hints(type(params))
    for item in dataclasses.fields(params):
        kinds = _allowed_types(hints[item.name])
        value = getattr(params, item.name)
        if not kinds or (value is None and type(None) in kinds):
            continue
        expected = " or ".join(_EXPECTED.get(kind, kind.__name__) for kind in kinds if kind is not type(None))
        config_check(any(_accepts(kind, value) for kind in kinds), item.name, value, expected)


def require_nonzero_sum(weights: Sequence[float]) -> None:
    """`normalize: true` divides by Σ w_i: refuse weights that cancel out."""
    if abs(sum(weights)) < 1e-8:
        raise MergeError(f"weights {list(weights)} sum to 0 but normalize: true divides by their sum; "
                         "change a weight or set normalize: false")


def require_unit_sum(weights: Sequence[float], tolerance: float = 1e-6) -> None:
    """An unnormalized model soup must be an affine combination: Σ w_i = 1."""
    if abs(sum(weights) - 1.0) > tolerance:
        raise MergeError(f"weights {list(weights)} sum to {sum(weights):g}, but linear with normalize: false "
                         "needs them to sum to 1; fix the weights or set normalize: true")

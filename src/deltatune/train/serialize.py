"""Lossless, pickle-free encoding of callback states: JSON for the structure, safetensors for the tensors.

Tensors (and numpy arrays) are moved out into a flat `{name: tensor}` dict and replaced by a reference;
tuples and dicts with non-string keys are tagged so that they come back as they went in.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from deltatune.errors import TrainingError

TENSOR, ARRAY, TUPLE, ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__dict_items__"


def encode(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """A JSON-ready form of `value`; tensors are added to `tensors` under `name`-derived keys."""
    if isinstance(value, Tensor):
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {TENSOR: name}
    if isinstance(value, np.ndarray):
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value)).clone()
        return {ARRAY: name}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [encode(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: encode(item, f"{name}.{key}", tensors) for key, item in value.items()}
        return {ITEMS: [[encode(key, f"{name}.k{i}", tensors), encode(item, f"{name}.{i}", tensors)]
                        for i, (key, item) in enumerate(value.items())]}
    raise TrainingError(f"callback state {name!r} holds a {type(value).__name__}; expected tensors, numbers, "
                        "strings, lists, tuples or dicts; convert it in the callback's state_dict()")


def decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of `encode`."""
    if isinstance(value, list):
        return [decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {TENSOR}:
        return tensors[value[TENSOR]]
    if set(value) == {ARRAY}:
        return tensors[value[ARRAY]].numpy()
    if set(value) == {TUPLE}:
        return tuple(decode(item, tensors) for item in value[TUPLE])
    if set(value) == {ITEMS}:
        return {_hashable(decode(key, tensors)): decode(item, tensors) for key, item in value[ITEMS]}
    return {key: decode(item, tensors) for key, item in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key

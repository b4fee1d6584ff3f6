"""Matching trainable budgets: set a method's declared budget knob so that it trains as many numbers as a target.

Every method config names the one field that sizes what it trains (`DeltaConfig.budget_field`: LoRA's `rank`,
SaRA's `fraction`, ...). `match_budget` searches that field — doubling or halving from its default until the
target is bracketed, then bisecting — counting the trainable numbers of the adapted model each time (adapting
is cheap: nothing trains). A method joins by declaring its field; one with no field (BitFit) or whose count
does not move with its field (ID³ trains a dense update and unmasks its budget during training) is reported
at its natural budget. The head every task trains (`Task.extra_trainable`) is left out of the count: it is the
same for every method.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from deltatune.errors import ConfigError, DeltatuneError

TOLERANCE = 0.05  # a match within 5% of the target counts as matched
MAX_PROBES = 40  # counts tried per match (each adapts one model)


@dataclass(frozen=True)
class BudgetMatch:
    """The knob value chosen for a target count; `field` None = the method's natural budget (no knob)."""

    method: str
    field: str | None
    value: Any
    count: int
    target: int | None

    @property
    def matched(self) -> bool:
        return self.target is not None and abs(self.count - self.target) <= TOLERANCE * self.target

    def params(self) -> dict[str, Any]:
        """The method parameters that realize this budget (empty at the natural budget)."""
        return {} if self.field is None else {self.field: self.value}


def adapter_count(model: nn.Module, extra_trainable: tuple[str, ...]) -> int:
    """Trainable numbers of an adapted model, without the modules every method trains (the task head)."""
    head = {id(p) for name in extra_trainable for p in model.get_submodule(name).parameters()}
    unique = {id(p): p for p in model.parameters() if p.requires_grad and id(p) not in head}
    return sum(p.numel() for p in unique.values())


def task_counter(task, method: str, seed: int = 0, common: dict[str, Any] | None = None,
                 batch_size: int = 32) -> Callable[[dict[str, Any]], int]:
    """params -> the adapter count of `method` with `common` and those params on `task`'s model, adapted as
    recipe.finetune adapts it; `batch_size` must be the training run's, since a planning method (SPT) plans
    on training batches of that size."""
    from deltatune.recipe import prepare_model

    def count(params: dict[str, Any]) -> int:
        model, _ = prepare_model(task, method, {**(common or {}), **params}, seed, batch_size)
        return adapter_count(model, tuple(task.extra_trainable))

    return count


def budget_field(method: str) -> tuple[str | None, Any]:
    """The method's declared knob and its default value (None, None for a method without one); 1 for a knob whose
    default is None."""
    from deltatune.core.registry import method_entry

    config_cls = method_entry(method).config_cls
    name = config_cls.budget_field
    if name is None:
        return None, None
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if name not in fields:
        raise ConfigError(f"{config_cls.__name__}.budget_field={name!r} names no field of the config; name the field "
                          "that sizes what the method trains, or None")
    default = fields[name].default
    # A knob whose default is None is derived from another field unless set (an adapter's bottleneck size from its
    # reduction factor): it is searched as an integer from 1 upwards.
    return name, 1 if default is None else default


def match_budget(method: str, target: int, count: Callable[[dict[str, Any]], int]) -> BudgetMatch:
    """The value of `method`'s budget knob whose count is nearest `target` (see the module docstring).

    `count(params)` gives the trainable count of the method with `params` and raises ConfigError (or another
    DeltatuneError) for a value the config refuses; refused values are treated as lying beyond the last value
    accepted in the direction searched.
    """
    name, default = budget_field(method)
    if name is None:
        return BudgetMatch(method, None, None, count({}), target)
    search = _KnobSearch(name, default, count)
    value = search.nearest(target)
    if value is None:
        raise ConfigError(f"{method}: no value of its budget field {name!r} is accepted near its default {default!r}")
    if search.unresponsive():
        return BudgetMatch(method, None, None, search.counts[value], target)
    return BudgetMatch(method, name, value, search.counts[value], target)


class _KnobSearch:
    """Bracket-then-bisect over one knob; counts are memoized, refused values remembered as None."""

    def __init__(self, name: str, default: Any, count: Callable[[dict[str, Any]], int]) -> None:
        self.name, self.default, self._count = name, default, count
        self.integer = isinstance(default, int) and not isinstance(default, bool)
        self.counts: dict[Any, int | None] = {}
        self.refused_high = False  # which end of the bracket, if any, is a refused value

    def measure(self, value: Any) -> int | None:
        if value not in self.counts:
            if len(self.counts) >= MAX_PROBES:
                raise DeltatuneError(f"budget matching of {self.name} tried {MAX_PROBES} values without converging")
            try:
                self.counts[value] = self._count({self.name: value})
            except DeltatuneError:
                self.counts[value] = None
        return self.counts[value]

    def unresponsive(self) -> bool:
        """True when every accepted value trained the same count: the knob does not size the trainable tensors."""
        seen = {c for c in self.counts.values() if c is not None}
        return len(seen) == 1 and sum(c is not None for c in self.counts.values()) > 1

    def nearest(self, target: int) -> Any:
        low, high = self._bracket(target)
        while low is not None and high is not None and self._apart(low, high):
            middle = self._middle(low, high)
            measured = self.measure(middle)
            if measured is None:  # refused inside the bracket: it lies on the refused end's side
                low, high = (low, middle) if self.refused_high else (middle, high)
            elif measured < target:
                low = middle
            else:
                high = middle
        accepted = [v for v, c in self.counts.items() if c is not None]
        return min(accepted, key=lambda v: (abs(self.counts[v] - target), v)) if accepted else None

    def _bracket(self, target: int) -> tuple[Any, Any]:
        """(low, high) with count(low) < target <= count(high) (None when the knob cannot go that far)."""
        value, measured = self.default, self.measure(self.default)
        if measured is None:
            return None, None
        step = 2 if measured < target else 0.5
        for _ in range(MAX_PROBES // 2):
            following = self._scaled(value, step)
            if following == value:
                break
            following_count = self.measure(following)
            if following_count is None:  # refused: the boundary of accepted values lies between the two
                self.refused_high = step == 2
                return (value, following) if step == 2 else (following, value)
            if following_count == measured:  # the count stopped moving with the knob
                break
            if (following_count >= target) == (step == 2):
                return (value, following) if step == 2 else (following, value)
            value, measured = following, following_count
        return None, None

    def _scaled(self, value: Any, factor: float) -> Any:
        if self.integer:
            return max(1, int(value * 2)) if factor > 1 else max(1, value // 2)
        return value * factor

    def _apart(self, low: Any, high: Any) -> bool:
        if self.integer:
            return high - low > 1
        return high / low > 1 + TOLERANCE / 4

    def _middle(self, low: Any, high: Any) -> Any:
        return (low + high) // 2 if self.integer else math.sqrt(low * high)

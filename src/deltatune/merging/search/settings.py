"""Choosing merge settings (density, weights, λ, ...) on a validation objective within a stated budget.

`search_settings(space, objective, budget=N)` evaluates exactly N settings of a `SearchSpace` and returns a
`SettingsRecord` of every evaluation (setting, score, its parts, seconds) in order, and the best. The optimiser
is the one `search_coefficients` already runs for PCB's coefficients (CMA-ES, `cma`), over the unit cube
[0, 1]^d mapped onto the dimensions' ranges, started at the centre with step 1/4 of each range; with one
dimension it is an evenly spaced sweep of N points (CMA-ES needs two). `grid_settings` is the baseline it is
compared with: every combination of given values (or k evenly spaced values per dimension, k^d <= budget).

The CMA-ES run is a deterministic function of the seed and the scores, and the budget only stops it: the first
n evaluations of a budget-N run are the whole of a budget-n run (tested), so the best within the first n is what
a budget-n search would pick.

`objective(setting)` returns a number (higher is better) or (number, {part: value}) to record its parts, e.g.
each task's accuracy. It must score **validation** data: choosing a setting on test data leaks.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deltatune.errors import ConfigError, config_check
from deltatune.merging.search.coefficients import search_coefficients
from deltatune.merging.search.space import SearchSpace

STRATEGIES = ("cmaes", "grid")
Objective = Callable[[dict[str, float]], "float | tuple[float, Mapping[str, float]]"]


@dataclass(frozen=True)
class SettingEvaluation:
    """One evaluated setting: its place in the run (1 = first), values, score (higher is better), parts and wall
    seconds."""

    index: int
    setting: dict[str, float]
    score: float
    parts: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class SettingsRecord:
    """Every evaluation of one search, in order, with what was asked (strategy, budget, seed, ranges)."""

    strategy: str
    budget: int
    seed: int
    ranges: dict[str, tuple[float, float]]
    evaluations: tuple[SettingEvaluation, ...]

    def best_within(self, count: int | None = None) -> SettingEvaluation:
        """The best of the first `count` evaluations (all by default); the earliest wins a tie."""
        considered = self.evaluations[: count if count is not None else len(self.evaluations)]
        config_check(bool(considered), "count", count, "at least one evaluation")
        return max(considered, key=lambda e: e.score)

    @property
    def best(self) -> SettingEvaluation:
        return self.best_within()

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.evaluations)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {"strategy": self.strategy, "budget": self.budget, "evaluations_used": len(self.evaluations),
                "seed": self.seed, "ranges": {k: list(v) for k, v in self.ranges.items()},
                "best": {"index": best.index, "setting": best.setting, "score": best.score, "parts": best.parts},
                "seconds": self.seconds,
                "evaluations": [{"index": e.index, "setting": e.setting, "score": e.score, "parts": e.parts,
                                 "seconds": e.seconds} for e in self.evaluations]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def to_markdown(self, title: str = "Merge setting search") -> str:
        names = list(self.ranges)
        parts = sorted({p for e in self.evaluations for p in e.parts})
        best = self.best
        lines = [f"# {title}", "",
                 f"Strategy {self.strategy}, seed {self.seed}, {len(self.evaluations)} of {self.budget} evaluations, "
                 f"{self.seconds:.1f} s. Best: evaluation {best.index} (score {best.score:.6g}).", "",
                 "| dimension | range | best |", "| --- | --- | ---: |"]
        lines += [f"| {n} | [{lo:g}, {hi:g}] | {best.setting[n]:.6g} |" for n, (lo, hi) in self.ranges.items()]
        lines += ["", "| # | " + " | ".join(names + parts) + " | score | seconds |",
                  "| ---: | " + " | ".join("---:" for _ in names + parts) + " | ---: | ---: |"]
        for e in self.evaluations:
            cells = [f"{e.setting[n]:.4g}" for n in names] + [f"{e.parts.get(p, math.nan):.4g}" for p in parts]
            marker = " **best**" if e.index == best.index else ""
            lines.append(f"| {e.index}{marker} | " + " | ".join(cells) + f" | {e.score:.6g} | {e.seconds:.2f} |")
        return "\n".join(lines) + "\n"


class _Evaluator:
    """Calls the objective, times it, and keeps every evaluation in order."""

    def __init__(self, space: SearchSpace, objective: Objective,
                 report: Callable[[SettingEvaluation], None] | None = None) -> None:
        self.space, self.objective, self.report = space, objective, report
        self.evaluations: list[SettingEvaluation] = []

    def __call__(self, setting: dict[str, float]) -> float:
        start = time.perf_counter()
        result = self.objective(dict(setting))
        score, parts = result if isinstance(result, tuple) else (result, {})
        score = float(score)
        if math.isnan(score):  # a NaN would make every comparison false: refuse it where it appears
            raise ConfigError(f"the objective returned NaN at {setting}; return a finite score (higher is better)")
        self.evaluations.append(SettingEvaluation(len(self.evaluations) + 1, dict(setting), score,
                                                  {k: float(v) for k, v in parts.items()},
                                                  time.perf_counter() - start))
        if self.report is not None:
            self.report(self.evaluations[-1])
        return score

    def record(self, strategy: str, budget: int, seed: int) -> SettingsRecord:
        ranges = {d.name: (d.low, d.high) for d in self.space.dimensions}
        return SettingsRecord(strategy, budget, seed, ranges, tuple(self.evaluations))


def search_settings(space: SearchSpace, objective: Objective, *, budget: int, seed: int = 0,
                    strategy: str = "cmaes", report: Callable[[SettingEvaluation], None] | None = None
                    ) -> SettingsRecord:
    """Maximise `objective` over `space` with exactly `budget` evaluations (`grid`: at most `budget`);
    `report` is called after each evaluation (progress lines)."""
    config_check(isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1, "budget", budget,
                 "an integer >= 1 (the number of merges evaluated)")
    config_check(strategy in STRATEGIES, "strategy", strategy, f"one of {', '.join(STRATEGIES)}")
    if strategy == "grid":
        return grid_settings(space, objective, budget=budget, report=report)
    evaluate = _Evaluator(space, objective, report)
    # CMA-ES in the unit cube, from its centre (ours: the ranges carry the user's prior, the centre is neutral)
    search_coefficients(lambda units: evaluate(space.setting_at(units)), len(space.dimensions), initial=0.5,
                        bounds=(0.0, 1.0), budget=budget, sigma=0.25, seed=seed)
    return evaluate.record(strategy, budget, seed)


def even_values(low: float, high: float, count: int) -> list[float]:
    """`count` evenly spaced values from low to high inclusive."""
    return [low + (high - low) * i / (count - 1) for i in range(count)] if count > 1 else [(low + high) / 2]


def grid_settings(space: SearchSpace, objective: Objective, values: Mapping[str, Sequence[float]] | None = None,
                  *, budget: int | None = None, report: Callable[[SettingEvaluation], None] | None = None
                  ) -> SettingsRecord:
    """Evaluate every combination of `values` (per dimension name), or of k evenly spaced values per dimension
    with k the largest integer such that k^d <= budget; the first dimension varies slowest."""
    if values is None:
        config_check(budget is not None and budget >= 1, "budget", budget, "an integer >= 1")
        count = int(math.floor(budget ** (1 / len(space.dimensions)) + 1e-9))
        if count < 2:
            raise ConfigError(f"budget={budget} is too small for a grid over {len(space.dimensions)} dimensions: "
                              f"it needs at least {2 ** len(space.dimensions)} (2 values each); raise --budget or "
                              "use --strategy cmaes")
        values = {d.name: even_values(d.low, d.high, count) for d in space.dimensions}
    missing = [n for n in space.names if not values.get(n)]
    if missing or set(values) - set(space.names):
        raise ConfigError(f"grid values must give a non-empty list for exactly the dimensions {space.names}; "
                          f"got {sorted(values)}")
    combinations = list(itertools.product(*(values[n] for n in space.names)))
    if budget is not None and len(combinations) > budget:
        raise ConfigError(f"the grid has {len(combinations)} settings, more than budget={budget}")
    evaluate = _Evaluator(space, objective, report)
    for combination in combinations:
        setting = dict(zip(space.names, map(float, combination)))
        space.check_setting(setting)
        evaluate(setting)
    return evaluate.record("grid", budget if budget is not None else len(combinations), 0)

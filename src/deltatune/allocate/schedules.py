"""Budget schedules: how many rank units the whole adapter may use at each optimizer step.

Steps count optimizer steps: `global_step` is 1 after the first `optimizer.step()`. Every schedule knows the
training length and refuses settings that would reach beyond it. `planned_budget(step)` is the budget the
schedule aims at (for growth schedules: a simulation assuming every chosen module can grow); `event_steps()`
lists the steps where the allocator acts. Both feed `plots.plot_schedule`.

| schedule | method | rule |
| --- | --- | --- |
| `CubicBudgetSchedule` | AdaLoRA | b(0) to t_i; b(T) + (b(0) − b(T))(1 − (t − t_i)/(T − t_i − t_f))³; then b(T) |
| `LinearGrowthSchedule` | IncreLoRA | after t_w, every Δ steps the top-h modules gain `add_rank` (linear budget) |
| `ThresholdGrowthSchedule` | TriAdaptLoRA | after t_w, every Δ steps k = ⌊left·p⌋ (linear) or ⌊left^p⌋ modules grow |
| `OneShotSchedule` | CoLoRA-style | a constant budget, re-allocated across layers once at step t_a |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from deltatune.errors import ConfigError, config_check

GROWTH_RULES = ("linear", "exponential")


def resolve_steps(value: int | float, total_steps: int, field: str) -> int:
    """A step count given as an integer (steps) or as a float share of training in [0, 1) -> steps."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{field}={value!r} is invalid: expected steps (an integer >= 0) or a share of "
                          "training in [0, 1)")
    if isinstance(value, float):
        if value >= 1:
            raise ConfigError(f"{field}={value!r} is invalid: a share of training must be in [0, 1); "
                              "give an integer to mean steps")
        return int(value * total_steps)
    return int(value)


def _check_total(total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps={total_steps!r} is invalid: expected the number of optimizer steps "
                          "of the run, an integer >= 1")


@dataclass(frozen=True)
class CubicBudgetSchedule:
    """AdaLoRA's budget (paper App. A; the form both official code and peft use): initial warm-up at b(0),
    cubic decrease to b(T), final fine-tuning at b(T); masks are applied every `mask_interval` steps of the
    cubic phase."""

    initial_budget: int
    final_budget: int
    total_steps: int
    initial_warmup: int = 0
    final_warmup: int = 0
    mask_interval: int = 1

    def __post_init__(self) -> None:
        _check_total(self.total_steps)
        config_check(0 <= self.final_budget <= self.initial_budget, "target budget", self.final_budget,
                     f"at most the initial budget {self.initial_budget}",
                     "the target rank must not exceed the initial rank (AdaLoRA only prunes)")
        config_check(self.mask_interval >= 1, "mask_interval", self.mask_interval, "an integer >= 1")
        config_check(self.initial_warmup >= 0 and self.final_warmup >= 0, "warm-up steps",
                     (self.initial_warmup, self.final_warmup), "steps >= 0")
        config_check(self.initial_warmup < self.total_steps - self.final_warmup, "initial_warmup + final_warmup",
                     self.initial_warmup + self.final_warmup,
                     f"fewer steps than the training length {self.total_steps} so that a budgeting phase exists",
                     "shorten the warm-ups or train longer")

    @property
    def final_phase_start(self) -> int:
        return self.total_steps - self.final_warmup

    def budget(self, step: int) -> int:
        if step <= self.initial_warmup:
            return self.initial_budget
        if step >= self.final_phase_start:
            return self.final_budget
        remaining = 1 - (step - self.initial_warmup) / (self.final_phase_start - self.initial_warmup)
        return int((self.initial_budget - self.final_budget) * remaining**3 + self.final_budget)

    def should_mask(self, step: int) -> bool:
        """True on the steps where the cubic phase re-masks (the final phase is handled by the allocator)."""
        return self.initial_warmup < step < self.final_phase_start and step % self.mask_interval == 0

    def planned_budget(self, step: int) -> int:
        return self.budget(step)

    def event_steps(self) -> list[int]:
        steps = [t for t in range(1, self.total_steps + 1) if self.should_mask(t)]
        return steps + [self.final_phase_start]

    def title(self) -> str:
        return (f"cubic budget: {self.initial_budget} -> {self.final_budget} (t_i={self.initial_warmup}, "
                f"t_f={self.final_warmup}, every {self.mask_interval})")


@dataclass(frozen=True)
class _GrowthSchedule:
    initial_budget: int
    target_budget: int
    total_steps: int
    modules: int
    add_rank: int
    initial_warmup: int = 0
    interval: int = 1

    def __post_init__(self) -> None:
        _check_total(self.total_steps)
        config_check(self.target_budget >= self.initial_budget, "target budget", self.target_budget,
                     f"at least the initial budget {self.initial_budget}",
                     "growth methods only add rank: raise the target rank or lower the initial rank")
        config_check(self.modules >= 1, "modules", self.modules, "at least one adapted module")
        config_check(self.add_rank >= 1, "add_rank", self.add_rank, "an integer >= 1")
        config_check(self.interval >= 1, "interval", self.interval, "an integer >= 1")
        config_check(0 <= self.initial_warmup < self.total_steps, "initial_warmup", self.initial_warmup,
                     f"steps in [0, {self.total_steps}) (the training length)", "shorten the warm-up or train longer")

    def is_event(self, step: int) -> bool:
        return step > self.initial_warmup and step % self.interval == 0

    def modules_to_grow(self, step: int, current_budget: int) -> int:
        raise NotImplementedError

    @cached_property
    def _curve(self) -> list[int]:
        return self._simulate()

    def _simulate(self) -> list[int]:
        """Budget after each step 0..T, assuming every chosen module grows by add_rank (capped at target)."""
        budget, curve = self.initial_budget, [self.initial_budget]
        for step in range(1, self.total_steps + 1):
            if budget < self.target_budget and self.is_event(step):
                budget = min(self.target_budget, budget + self.modules_to_grow(step, budget) * self.add_rank)
            curve.append(budget)
        return curve

    def _check_reaches_target(self) -> None:
        final = self._curve[-1]
        if final < self.target_budget:
            raise ConfigError(
                f"the growth schedule reaches {final} of the target {self.target_budget} rank units within "
                f"total_steps={self.total_steps}: its steps reach beyond the training length; lower the "
                "interval or the warm-up, grow more modules per event, or train longer"
            )

    def planned_budget(self, step: int) -> int:
        return self._curve[min(max(step, 0), self.total_steps)]

    def event_steps(self) -> list[int]:
        curve = self._curve
        return [t for t in range(1, self.total_steps + 1) if curve[t] > curve[t - 1]]


@dataclass(frozen=True)
class LinearGrowthSchedule(_GrowthSchedule):
    """IncreLoRA's growth (official code): after `initial_warmup`, every `interval` steps the `top_modules`
    most important modules gain `add_rank` components, until the target; the budget grows linearly."""

    top_modules: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.top_modules >= 1, "top_modules", self.top_modules, "an integer >= 1")
        self._check_reaches_target()

    def modules_to_grow(self, step: int, current_budget: int) -> int:
        return min(self.top_modules, self.modules)

    def title(self) -> str:
        return (f"linear growth: {self.initial_budget} -> {self.target_budget} (top {self.top_modules} "
                f"+{self.add_rank} every {self.interval} after {self.initial_warmup})")


@dataclass(frozen=True)
class ThresholdGrowthSchedule(_GrowthSchedule):
    """TriAdaptLoRA's threshold-driven growth (code found citing arXiv 2501.08008): with progress
    p = (t − t_w)/(T − t_w) and `remaining` rank units, k = ⌊remaining·p⌋ ("linear", the paper's best) or
    k = ⌊remaining^p⌋ ("exponential", the code's "non-linear") modules grow, clamped to [1, modules]."""

    rule: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.rule in GROWTH_RULES, "growth rule", self.rule, f"one of {GROWTH_RULES}")
        self._check_reaches_target()

    def modules_to_grow(self, step: int, current_budget: int) -> int:
        remaining = self.target_budget - current_budget
        if remaining <= 0:
            return 0
        progress = (step - self.initial_warmup) / (self.total_steps - self.initial_warmup)
        if self.rule == "linear":
            count = int(remaining * progress)
        else:
            count = int(math.exp(progress * math.log(remaining)))
        return min(max(count, 1), self.modules)

    def title(self) -> str:
        return (f"{self.rule} threshold growth: {self.initial_budget} -> {self.target_budget} "
                f"(+{self.add_rank} per module, every {self.interval} after {self.initial_warmup})")


@dataclass(frozen=True)
class OneShotSchedule:
    """A constant budget re-split across layers once, at `allocate_at` (CoLoRA-style capacity)."""

    budget: int
    total_steps: int
    allocate_at: int

    def __post_init__(self) -> None:
        _check_total(self.total_steps)
        config_check(1 <= self.allocate_at < self.total_steps, "allocate_at", self.allocate_at,
                     f"a step in [1, {self.total_steps}) (the training length)",
                     "measure contributions for fewer steps or train longer")

    def planned_budget(self, step: int) -> int:
        return self.budget

    def event_steps(self) -> list[int]:
        return [self.allocate_at]

    def title(self) -> str:
        return f"one-shot allocation of {self.budget} rank units at step {self.allocate_at}"

"""Budget schedules: hand-computed values, bounds, and refusal of steps beyond the training length."""
from __future__ import annotations

import pytest

from deltatune.allocate.schedules import (
    CubicBudgetSchedule,
    LinearGrowthSchedule,
    OneShotSchedule,
    ThresholdGrowthSchedule,
    resolve_steps,
)
from deltatune.errors import ConfigError


def test_cubic_schedule_by_hand():
    schedule = CubicBudgetSchedule(initial_budget=48, final_budget=32, total_steps=100, initial_warmup=10,
                                   final_warmup=20, mask_interval=5)
    assert schedule.budget(0) == 48 and schedule.budget(10) == 48
    # t = 40: 1 − (40 − 10)/(100 − 20 − 10) = 4/7; 16·(4/7)³ + 32 = 34.985... -> 34
    assert schedule.budget(40) == 34
    assert schedule.budget(80) == 32 and schedule.budget(100) == 32
    assert [t for t in range(1, 101) if schedule.should_mask(t)] == list(range(15, 80, 5))
    assert schedule.event_steps()[-1] == 80


def test_cubic_schedule_is_monotone():
    schedule = CubicBudgetSchedule(120, 80, 500, 50, 200, 1)
    budgets = [schedule.budget(t) for t in range(501)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))


def test_cubic_schedule_refuses_bad_settings():
    with pytest.raises(ConfigError, match="target budget=60.*initial budget 48"):
        CubicBudgetSchedule(48, 60, 100)
    with pytest.raises(ConfigError, match="initial_warmup \\+ final_warmup=100.*training length 100"):
        CubicBudgetSchedule(48, 32, 100, initial_warmup=50, final_warmup=50)
    with pytest.raises(ConfigError, match="total_steps"):
        CubicBudgetSchedule(48, 32, 0)


def test_linear_growth_by_hand():
    schedule = LinearGrowthSchedule(initial_budget=4, target_budget=10, total_steps=50, modules=4, add_rank=1,
                                    initial_warmup=5, interval=5, top_modules=2)
    assert schedule.event_steps() == [10, 15, 20]
    assert [schedule.planned_budget(t) for t in (9, 10, 15, 20, 50)] == [4, 6, 8, 10, 10]


def test_growth_that_cannot_finish_in_time_is_refused():
    with pytest.raises(ConfigError, match="reach beyond the training length"):
        LinearGrowthSchedule(initial_budget=4, target_budget=40, total_steps=50, modules=4, add_rank=1,
                             initial_warmup=5, interval=10, top_modules=1)
    with pytest.raises(ConfigError, match="initial_warmup=60"):
        LinearGrowthSchedule(4, 8, 50, 4, 1, initial_warmup=60)
    with pytest.raises(ConfigError, match="growth methods only add rank"):
        ThresholdGrowthSchedule(8, 4, 50, 4, 1)


def test_threshold_growth_counts_by_hand():
    linear = ThresholdGrowthSchedule(initial_budget=12, target_budget=96, total_steps=100, modules=12, add_rank=4,
                                     initial_warmup=0, interval=10, rule="linear")
    # t = 50: p = 0.5, remaining 84 -> k = 42, clamped to 12 modules; t = 10: k = int(8.4) = 8
    assert linear.modules_to_grow(50, 12) == 12
    assert linear.modules_to_grow(10, 12) == 8
    assert linear.modules_to_grow(1, 90) == 1  # int(6 · 0.01) = 0 -> at least one
    exponential = ThresholdGrowthSchedule(12, 96, 100, 12, 4, rule="exponential", interval=10)
    assert exponential.modules_to_grow(50, 12) == int(84 ** 0.5)
    assert linear.planned_budget(100) == 96


def test_one_shot_and_step_resolution():
    assert OneShotSchedule(24, 100, 10).event_steps() == [10]
    with pytest.raises(ConfigError, match="allocate_at=100"):
        OneShotSchedule(24, 100, 100)
    assert resolve_steps(0.25, 200, "x") == 50 and resolve_steps(7, 200, "x") == 7
    with pytest.raises(ConfigError, match="share of training"):
        resolve_steps(1.5, 200, "initial_warmup")

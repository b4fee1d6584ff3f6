"""Allocation engine: spend a fixed budget of trainable rank where it matters, and move it during training.

- `importance`: pure estimators (sensitivity and its EMA/uncertainty, component importance, IncreLoRA's
  ΔW⊙∂L/∂ΔW score, TriAdaptLoRA's normalized Frobenius norm, path/integrated-gradient contribution).
- `schedules`: budgets over steps (AdaLoRA's cubic, linear growth, threshold-driven growth, one-shot).
- `pruning`, `growth`, `contribution`: allocators (prune, grow, re-split across layers) over deltas that have
  the capabilities in `protocols`; `allocator.Allocator` is the base, with a trainer callback.
- `slots`: the fixed-slot low-rank delta shared by the budget-adaptive methods.
- `fresh_state`: components that an allocator adds get a new parameter's optimizer state (Adam, AdamW, SGD).
- `describe`, `plots`: the decisions as a dict, a rank heat map and a schedule plot.

Plain loop (after `config = AdaLoRAConfig(...)`; `deltatune.adapt(model, config)`)::

    allocator = config.allocator(model, total_steps)
    for global_step, batch in enumerate(batches, start=1):
        loss = task_loss(model, batch) + deltatune.regularization_loss(model)
        loss.backward()
        optimizer.step()
        allocator.step(model, global_step, optimizer)     # after optimizer.step(), before zero_grad()
        optimizer.zero_grad()

With the deltatune trainer: `config.training_callbacks(model, total_steps)` (the recipe does this).
"""
from deltatune.allocate.allocator import AllocationError, Allocator, AllocatorCallback
from deltatune.allocate.contribution import ContributionAllocator
from deltatune.allocate.describe import describe_allocation, ranks_from_tensors
from deltatune.allocate.fresh_state import FreshSlotAllocator
from deltatune.allocate.growth import FrobeniusGrowthScore, GrowthAllocator, SmoothedDeltaGradientScore
from deltatune.allocate.protocols import (
    CanGrowRank,
    CanPruneRank,
    CanResizeRank,
    HasNewSlots,
    HasRankComponents,
    HasTriangularCore,
)
from deltatune.allocate.pruning import SensitivityPruner
from deltatune.allocate.schedules import (
    CubicBudgetSchedule,
    LinearGrowthSchedule,
    OneShotSchedule,
    ThresholdGrowthSchedule,
)

__all__ = [
    "AllocationError", "Allocator", "AllocatorCallback", "CanGrowRank", "CanPruneRank", "CanResizeRank",
    "ContributionAllocator", "CubicBudgetSchedule", "FreshSlotAllocator", "FrobeniusGrowthScore", "GrowthAllocator",
    "HasNewSlots", "HasRankComponents",
    "HasTriangularCore", "LinearGrowthSchedule", "OneShotSchedule", "SensitivityPruner",
    "SmoothedDeltaGradientScore", "ThresholdGrowthSchedule", "describe_allocation", "ranks_from_tensors",
]

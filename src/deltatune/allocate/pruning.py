"""Prune rank components under a shrinking global budget (AdaLoRA's allocator, paper §3.3 and App. A).

Every step before the final phase the entry-wise sensitivity of every component tensor is smoothed (Eq. 10–12);
on masking steps each component gets the importance of Eq. 9 and every component whose importance is at or
below the (b(0) − b(t))-th smallest over all modules is switched off (its value set to zero, as both official
code and peft do: it stays trainable and may come back at the next masking step). At t = T − t_f the pattern is
fixed at the target budget, the scores are dropped, and the pattern is re-applied after every later step.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.allocator import AllocationError, Allocator
from deltatune.allocate.importance import (
    component_importance,
    sensitivity,
    sensitivity_score,
    smooth_sensitivity,
)
from deltatune.allocate.protocols import CanPruneRank, HasRankComponents
from deltatune.allocate.schedules import CubicBudgetSchedule


class SensitivityPruner(Allocator):
    """Sensitivity × uncertainty importance, cubic global budget, masks on the components' values."""

    required: ClassVar[tuple[type, ...]] = (HasRankComponents, CanPruneRank)

    def __init__(
        self, model: nn.Module, *, target_rank: int, total_steps: int, initial_warmup: int = 0,
        final_warmup: int = 0, mask_interval: int = 1, beta1: float = 0.85, beta2: float = 0.85,
        adapter: str = "default",
    ) -> None:
        super().__init__(model, total_steps, adapter)
        initial = sum(delta.rank_capacity for delta in self.deltas.values())
        final = target_rank * len(self.deltas)
        if final > initial:
            raise AllocationError(
                f"target budget {final} ({target_rank} per module × {len(self.deltas)}) is larger than the "
                f"initial budget {initial}; a pruning allocator needs target_rank <= the initial rank"
            )
        self.schedule = CubicBudgetSchedule(initial, final, total_steps, initial_warmup, final_warmup, mask_interval)
        self.beta1, self.beta2 = beta1, beta2
        self.average: dict[str, Tensor] = {}
        self.uncertainty: dict[str, Tensor] = {}
        self.pattern_fixed = False

    def _step(self, global_step: int) -> None:
        final_start = self.schedule.final_phase_start
        if global_step < final_start:
            self._update_sensitivity()
            if self.schedule.should_mask(global_step):
                self.mask_to_budget(self.schedule.budget(global_step))
        elif not self.pattern_fixed:
            # the first step of the final phase (also when resuming past it): fix the pattern at b(T). A run so
            # short that it starts in the final phase has recorded no importance yet: this step's decides.
            if not self.average:
                self._update_sensitivity()
            self.mask_to_budget(self.schedule.final_budget)
            self.pattern_fixed = True
            self.average, self.uncertainty = {}, {}
        else:
            for delta in self.deltas.values():
                delta.prune_components(delta.rank_mask.clone())

    def _update_sensitivity(self) -> None:
        for path, delta in self.deltas.items():
            for name, (parameter, _) in delta.component_tensors().items():
                key = f"{path}.{name}"
                current = sensitivity(parameter, self.gradient(parameter, key, module=path))
                average = self.average.get(key, torch.zeros_like(current))
                uncertainty = self.uncertainty.get(key, torch.zeros_like(current))
                self.average[key], self.uncertainty[key] = smooth_sensitivity(
                    current, average, uncertainty, self.beta1, self.beta2)

    def component_scores(self) -> dict[str, Tensor]:
        """Module path -> importance of each of its components (AdaLoRA Eq. 9)."""
        scores = {}
        for path, delta in self.deltas.items():
            parts = []
            for name, (_, slot_dim) in delta.component_tensors().items():
                key = f"{path}.{name}"
                if key not in self.average:
                    raise AllocationError(f"no importance recorded yet for {key}; step the allocator every step")
                parts.append((sensitivity_score(self.average[key], self.uncertainty[key]), slot_dim))
            scores[path] = component_importance(parts)
        return scores

    def mask_to_budget(self, budget: int) -> None:
        """Keep the components whose importance is above the (initial − budget)-th smallest (ties pruned)."""
        scores = self.component_scores()
        prune = self.schedule.initial_budget - budget
        if prune <= 0:
            return
        threshold = torch.kthvalue(torch.cat([s.reshape(-1) for s in scores.values()]), prune).values
        for path, delta in self.deltas.items():
            delta.prune_components(scores[path] > threshold)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(pattern_fixed=self.pattern_fixed,
                     average={k: v.clone() for k, v in self.average.items()},
                     uncertainty={k: v.clone() for k, v in self.uncertainty.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pattern_fixed = bool(state["pattern_fixed"])
        self.average = {k: v.clone() for k, v in state["average"].items()}
        self.uncertainty = {k: v.clone() for k, v in state["uncertainty"].items()}

"""Re-allocate a fixed rank budget across layers once, from each layer's measured contribution (CoLoRA-style).

For the first `allocate_at` steps every module trains at the uniform rank while the allocator accumulates,
per module, the first-order loss change its parameters produced along the training path:
c_i = |Σ_t ⟨∇θ_i L_t, θ_i,t+1 − θ_i,t⟩| (`importance.path_contribution`). At `allocate_at` the budget
(the sum of the live ranks) is split in proportion to c_i (`importance.proportional_ranks`, each module within
[min_rank, its capacity]) and every module is resized once; nothing moves afterwards.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.allocate.fresh_state import FreshSlotAllocator
from deltatune.allocate.importance import proportional_ranks
from deltatune.allocate.protocols import CanResizeRank, HasRankComponents
from deltatune.allocate.schedules import OneShotSchedule


class ContributionAllocator(FreshSlotAllocator):
    """Path-integrated contribution per module, then one proportional re-split of the budget (added components
    get a new parameter's optimizer state, `fresh_state`)."""

    required: ClassVar[tuple[type, ...]] = (HasRankComponents, CanResizeRank)

    def __init__(
        self, model: nn.Module, *, allocate_at: int, total_steps: int, min_rank: int = 1, adapter: str = "default",
    ) -> None:
        super().__init__(model, total_steps, adapter)
        self.schedule = OneShotSchedule(self.total_rank, total_steps, allocate_at)
        self.min_rank = min_rank
        self.contribution: dict[str, float] = dict.fromkeys(self.deltas, 0.0)
        self.allocated = False
        self._previous: dict[str, list[Tensor]] = {}
        self._remember_parameters()

    def _remember_parameters(self) -> None:
        self._previous = {
            path: [p.detach().clone() for p, _ in delta.component_tensors().values()]
            for path, delta in self.deltas.items()
        }

    def _step(self, global_step: int) -> None:
        if self.allocated:
            return
        self._accumulate()
        if global_step >= self.schedule.allocate_at:
            self.allocate(global_step)
        else:
            self._remember_parameters()

    def _accumulate(self) -> None:
        """Add ⟨g_t, θ_{t+1} − θ_t⟩ per module (g_t taken at θ_t; θ_{t+1} is after the optimizer step)."""
        for path, delta in self.deltas.items():
            total = 0.0
            for (parameter, _), before in zip(delta.component_tensors().values(), self._previous[path]):
                gradient = self.gradient(parameter, path)
                total += float((gradient.double() * (parameter.detach().double() - before.double())).sum())
            self.contribution[path] += total

    def planned_ranks(self) -> dict[str, int]:
        scores = {path: abs(value) for path, value in self.contribution.items()}
        capacity = {path: delta.rank_capacity for path, delta in self.deltas.items()}
        return proportional_ranks(scores, self.schedule.budget, self.min_rank, capacity)

    def allocate(self, step: int) -> dict[str, int]:
        ranks = self.planned_ranks()
        for path, rank in ranks.items():
            self.reinitialize(path, lambda path=path, rank=rank: self.deltas[path].resize_rank(rank, step))
        self.allocated = True
        self._previous = {}
        return ranks

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(allocated=self.allocated, contribution=dict(self.contribution))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.allocated = bool(state["allocated"])
        self.contribution = {k: float(v) for k, v in state["contribution"].items()}
        if not self.allocated:
            self._remember_parameters()


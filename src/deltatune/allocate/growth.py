"""Grow rank components where a module score is highest, under a growing global budget.

One allocator serves IncreLoRA and TriAdaptLoRA; they differ in the module score and the schedule:

- `SmoothedDeltaGradientScore` (IncreLoRA): every step, σ = Σ|ΔW ⊙ ∂L/∂ΔW|/√n per module, smoothed with
  AdaLoRA's sensitivity EMA and uncertainty (score = Ī·Ū); ∂L/∂ΔW comes from a `DeltaGradientProbe`.
- `FrobeniusGrowthScore` (TriAdaptLoRA): at each event, the increase of ‖C‖_F / K since the previous event.

At an event the schedule says how many modules grow; modules are taken by decreasing score (those tied with
the last chosen score grow too, as in both official codes) and each gains `add_rank` components from its free
slots, until the global target. Deviation from both codes: the target is never exceeded (the last module
grows by what is left) and a module with no free slot is skipped for the next one.

New components get a new parameter's optimizer state (moments at zero, their own step count for Adam's bias
correction: `fresh_state`), as the official IncreLoRA code's new parameter groups do. `UpdateWarmup` restarts
a linear learning-rate warm-up for them (those groups' own warm-up) by scaling each new slot's update of the
step just taken.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.allocator import AllocationError, warn_no_gradient
from deltatune.allocate.fresh_state import FreshSlotAllocator
from deltatune.allocate.importance import (
    delta_gradient_score,
    normalized_frobenius,
    sensitivity_score,
    smooth_sensitivity,
)
from deltatune.allocate.probes import DeltaGradientProbe
from deltatune.allocate.protocols import (
    CanGrowRank,
    CanWarmUpComponents,
    HasActivationObserver,
    HasRankComponents,
    HasTriangularCore,
)


class SmoothedDeltaGradientScore:
    """IncreLoRA's module importance: EMA sensitivity × uncertainty of Σ|ΔW ⊙ ∂L/∂ΔW|/√n, updated every step."""

    required: ClassVar[tuple[type, ...]] = (HasActivationObserver,)

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.average: dict[str, Tensor] = {}
        self.uncertainty: dict[str, Tensor] = {}
        self.probe: DeltaGradientProbe | None = None
        self._warned_no_gradient: set[str] = set()

    def attach(self, deltas: dict[str, nn.Module]) -> None:
        self.probe = DeltaGradientProbe(deltas)

    def observe(self, deltas: dict[str, nn.Module], step: int) -> None:
        """Smooth this step's score; a module no backward pass reached (while others were) scores 0."""
        if not any(self.probe.has_gradient(delta) for delta in deltas.values()):
            raise AllocationError(
                f"no backward pass reached any of the {len(deltas)} adapted modules since the last allocator step: "
                "call allocator.step once per optimizer step, after loss.backward() and optimizer.step()"
            )
        for path, delta in deltas.items():
            gradient = self.probe.delta_gradient(delta)
            if gradient is None:
                warn_no_gradient(path, step, self._warned_no_gradient)
                current = torch.zeros((), dtype=torch.float64)
            else:
                current = delta_gradient_score(delta.delta_matrix(), gradient).to(torch.float64).cpu()
            average = self.average.get(path, torch.zeros((), dtype=torch.float64))
            uncertainty = self.uncertainty.get(path, torch.zeros((), dtype=torch.float64))
            self.average[path], self.uncertainty[path] = smooth_sensitivity(
                current, average, uncertainty, self.beta1, self.beta2)

    def scores(self, deltas: dict[str, nn.Module], step: int) -> dict[str, float]:
        return {p: float(sensitivity_score(self.average[p], self.uncertainty[p])) for p in deltas}

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()

    def state_dict(self) -> dict[str, Any]:
        return {"average": dict(self.average), "uncertainty": dict(self.uncertainty)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in state["average"].items()}
        self.uncertainty = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in state["uncertainty"].items()}


class FrobeniusGrowthScore:
    """TriAdaptLoRA's module importance: growth of the normalized core norm ‖C‖_F / K since the last event."""

    required: ClassVar[tuple[type, ...]] = (HasTriangularCore,)

    def __init__(self) -> None:
        self.previous: dict[str, float] = {}

    def attach(self, deltas: dict[str, nn.Module]) -> None:
        for path, delta in deltas.items():  # the code scores once at init; later scores are differences
            self.previous.setdefault(path, self._norm(delta))

    @staticmethod
    def _norm(delta: nn.Module) -> float:
        return float(normalized_frobenius(delta.core_matrix(), max(delta.block_count, 1)))

    def observe(self, deltas: dict[str, nn.Module], step: int) -> None:
        """Nothing per step: the score is computed at events only."""

    def scores(self, deltas: dict[str, nn.Module], step: int) -> dict[str, float]:
        scores = {}
        for path, delta in deltas.items():
            now = self._norm(delta)
            scores[path], self.previous[path] = now - self.previous.get(path, 0.0), now
        return scores

    def close(self) -> None:
        """Nothing to release."""

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self.previous)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = {k: float(v) for k, v in state["previous"].items()}


class UpdateWarmup:
    """Scale the update each new component received in the step just taken by its warm-up factor.

    After `step(t)` snapshots the slots still warming up, the optimizer's step t+1 moves them; `apply(t+1)`
    then replaces θ by θ_before + f·(θ − θ_before). With the slots' fresh state (`fresh_state`), for SGD and
    Adam(W) this equals running them as a new parameter group at f × the learning rate (weight decay
    included)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self._before: dict[tuple[str, str], tuple[Tensor, int]] = {}

    @torch.no_grad()
    def apply(self, deltas: dict[str, nn.Module], step: int) -> None:
        for (path, name), (previous, slot_dim) in self._before.items():
            delta = deltas[path]
            parameter = delta.component_tensors()[name][0]
            factor = delta.update_factors(step, self.steps)[name]
            shape = [1] * parameter.dim()
            shape[slot_dim] = -1
            factor = factor.to(device=parameter.device, dtype=parameter.dtype).reshape(shape)
            parameter.copy_(previous + factor * (parameter - previous))
        self._before = {}

    @torch.no_grad()
    def snapshot(self, deltas: dict[str, nn.Module], step: int) -> None:
        """Keep a copy of the tensors whose slots will still be warming up at the next step."""
        if self.steps <= 0:
            return
        for path, delta in deltas.items():
            if not isinstance(delta, CanWarmUpComponents):
                continue
            for name, factor in delta.update_factors(step + 1, self.steps).items():
                if bool((factor < 1).any()):
                    parameter, slot_dim = delta.component_tensors()[name]
                    self._before[(path, name)] = (parameter.detach().clone(), slot_dim)

    def state_dict(self) -> dict[str, Tensor]:
        """The pending snapshots (a resumed run scales the next update exactly as an uninterrupted one)."""
        return {f"{path}|{name}": previous.clone() for (path, name), (previous, _) in self._before.items()}

    def load_state_dict(self, state: dict[str, Tensor], deltas: dict[str, nn.Module]) -> None:
        self._before = {}
        for key, previous in state.items():
            path, name = key.split("|")
            slot_dim = deltas[path].component_tensors()[name][1]
            self._before[(path, name)] = (previous.clone(), slot_dim)


class GrowthAllocator(FreshSlotAllocator):
    """Grow `add_rank` components on the best modules at each schedule event until the target budget; the
    new components get a new parameter's optimizer state (`fresh_state`)."""

    required: ClassVar[tuple[type, ...]] = (HasRankComponents, CanGrowRank)

    def __init__(
        self, model: nn.Module, *, schedule: Any, scorer: Any, add_rank: int, total_steps: int,
        adapter: str = "default", warmup_steps: int = 0,
    ) -> None:
        super().__init__(model, total_steps, adapter)
        missing = [p.__name__ for p in scorer.required if not all(isinstance(d, p) for d in self.deltas.values())]
        if missing:
            raise AllocationError(f"the deltas of adapter {adapter!r} lack {missing}, which this score needs")
        self.schedule, self.scorer, self.add_rank = schedule, scorer, add_rank
        self.warmup = UpdateWarmup(warmup_steps)
        self.finished = self.total_rank >= schedule.target_budget
        if not self.finished:
            scorer.attach(self.deltas)

    def _step(self, global_step: int) -> None:
        self.warmup.apply(self.deltas, global_step)
        if not self.finished:
            self.scorer.observe(self.deltas, global_step)
            if self.schedule.is_event(global_step):
                self.grow(global_step)
            if self.total_rank >= self.schedule.target_budget:
                self._finish()
        self.warmup.snapshot(self.deltas, global_step)

    def grow(self, step: int) -> dict[str, int]:
        """One growth event: returns module path -> components added."""
        scores = self.scorer.scores(self.deltas, step)
        count = self.schedule.modules_to_grow(step, self.total_rank)
        order = sorted(self.deltas, key=lambda p: -scores[p])  # stable: ties keep module order
        threshold = scores[order[min(count, len(order)) - 1]]
        added: dict[str, int] = {}
        for path in order:
            left = self.schedule.target_budget - self.total_rank
            if left <= 0 or (len(added) >= count and scores[path] < threshold):
                break
            grown = self.reinitialize(
                path, lambda path=path, left=left: self.deltas[path].grow_rank(min(self.add_rank, left), step))
            if grown:
                added[path] = grown
        return added

    def _finish(self) -> None:
        self.finished = True
        self.scorer.close()
        for delta in self.deltas.values():
            delta.stop_growth()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(finished=self.finished, scorer=self.scorer.state_dict(), warmup=self.warmup.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scorer.load_state_dict(state["scorer"])
        self.warmup.load_state_dict(state["warmup"], self.deltas)
        if bool(state["finished"]) and not self.finished:
            self._finish()

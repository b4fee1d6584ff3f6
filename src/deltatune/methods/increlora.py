"""IncreLoRA: incremental rank growth (Zhang et al., 2023, arXiv:2308.12043).

    ΔW = (alpha / (live rank + 1e-5)) · B diag(e) A        (SVD-like form; the scale follows the live rank)

Each module starts at `init_rank` live components (A, B ~ N(0, 0.02²), e = 0: ΔW = 0) plus `rank_step`
**reserve** components whose a, b are already trainable while their e is held at 1e-5 ("advance learning":
they learn a direction before they count). Every `interval` steps after `initial_warmup`, the `top_modules`
modules with the highest smoothed score Ī·Ū of σ = Σ|ΔW ⊙ ∂L/∂ΔW|/√n activate their reserves (e becomes
trainable from 1e-5) and get fresh reserves, until the average rank is `target_rank`; then the remaining
reserves are switched off (`allocate.GrowthAllocator` with `SmoothedDeltaGradientScore`). New components
restart a linear learning-rate warm-up (the code's per-group schedule) through `allocate.UpdateWarmup`.

Saved tensors (per module): ``lora_A`` (capacity, in) — (capacity, in, *kernel) for convolutions —,
``lora_E`` (capacity, 1), ``lora_B`` (out, capacity) — (out, capacity, 1, ...) for convolutions —,
``rank_mask`` (capacity,) bool (live components), ``reserve_mask`` (capacity,) bool, ``trained_since`` and
``live_since`` (capacity,) int64 (the step each slot started training / became live, −1 = from the start).

The paper body was not available; everything follows the official code (FeiyuZhang98/IncreLoRA). Defaults:
init_rank 1, target_rank 2, top_modules 2, β 0.85, γ 0.1, alpha 16 (README MNLI command); rank_step =
target_rank / 2 (the code's table); warm-up and interval 1% of training (README MNLI: 1000 of ~110k steps);
advance learning and restart warm-up on (the code's defaults). Deviations:
- Fixed shapes: each module has `max_rank` + `rank_step` slots (default max_rank = min(4 × target_rank, in,
  out)); the code's lists grow without bound. A full module is skipped for the next best one.
- New components are not new parameters in a new optimizer parameter group (the code's
  `optimizer.add_param_group` of each new rank-1 a, b at reserve creation and of e at activation), but slots of
  fixed tensors. They get the same optimizer state: at creation (a, b) or activation (e) their moments are
  zeroed and they count their own steps for Adam's bias correction (`allocate.fresh_state`; Adam, AdamW and
  SGD — other optimizers are refused); the group's warm-up is their update scaled by the warm-up factor. The
  code's later decay of those groups' learning rate (over the remaining steps) is not reproduced, and without
  advance learning the held reserves' a, b are still under the optimizer's weight decay before activation.
- The growth never overshoots the target (the code can, by rank_step − 1 per module or on ties).
- ∂L/∂ΔW is summed over accumulated micro-batches (the code keeps the last micro-batch's).
- The orthogonality regularizer acts on the concatenated live and reserve components (the code applies it
  to each stored rank-1 block separately, which only normalizes them); "code" form: plain norms, averaged.
- The allocator steps after `optimizer.step()` (the code calls it just before).
- Layer kinds: every kind (∂L/∂ΔW is formed with the layer's own op); the code has Linear only.
- Output at step 0 differs from the base model by the reserves' 1e-5 terms (exact when advance_learning=False).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.growth import GrowthAllocator, SmoothedDeltaGradientScore
from deltatune.allocate.schedules import LinearGrowthSchedule, resolve_steps
from deltatune.allocate.slots import SlottedLowRankDelta, gaussian, orthogonality_penalty
from deltatune.allocate.support import (
    adapter_name_of,
    check_common,
    check_growth_ranks,
    check_share_or_steps,
    default_max_rank,
    set_mean_regularization,
)
from deltatune.core.config import DeltaConfig
from deltatune.core.layers import LayerInfo
from deltatune.core.model import iter_deltas
from deltatune.core.registry import register_method
from deltatune.errors import config_check

RESERVE_VALUE = 1e-5  # the code's e of a reserve component


@dataclass(frozen=True)
class IncreLoRAConfig(DeltaConfig):
    """IncreLoRA hyper-parameters.

    Args:
        init_rank: live components per module at the start.
        target_rank: average live rank per module at the end (total = target_rank × #modules).
        rank_step: components a chosen module gains per event (None: max(1, target_rank // 2)).
        max_rank: most live components one module may reach (None: min(4 × target_rank, in, out)).
        top_modules: modules that grow per event (the code's top_h).
        initial_warmup, interval: steps before the first event and between events (int) or shares of training.
        restart_warmup: warm-up length for new components (steps or share; 0 turns it off).
        advance_learning: train reserves before they are activated.
        alpha, dropout, beta1, beta2, orthogonal_weight, orthogonal_form: as in AdaLoRA.
        seed: seeds the initialization of reserves created during training.
    """
    budget_field: ClassVar[str | None] = "target_rank"

    init_rank: int = 1
    target_rank: int = 2
    rank_step: int | None = None
    max_rank: int | None = None
    top_modules: int = 2
    initial_warmup: int | float = 0.01
    interval: int | float = 0.01
    restart_warmup: int | float = 0.01
    advance_learning: bool = True
    alpha: float = 16.0
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    orthogonal_weight: float = 0.1
    orthogonal_form: str = "code"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_growth_ranks(self, "IncreLoRA")
        config_check(isinstance(self.top_modules, int) and self.top_modules >= 1, "top_modules", self.top_modules,
                     "an integer >= 1")
        for name in ("initial_warmup", "interval", "restart_warmup"):
            check_share_or_steps(getattr(self, name), name)
        config_check(self.interval != 0, "interval", self.interval, "at least one step (or a share > 0)")
        check_common(self)

    @property
    def step_size(self) -> int:
        return self.rank_step if self.rank_step is not None else max(1, self.target_rank // 2)

    def allocator(self, model: nn.Module, total_steps: int) -> GrowthAllocator:
        adapter = adapter_name_of(model, self)
        modules = sum(1 for _ in iter_deltas(model, adapter))
        schedule = LinearGrowthSchedule(
            initial_budget=self.init_rank * modules, target_budget=self.target_rank * modules,
            total_steps=total_steps, modules=modules, add_rank=self.step_size,
            initial_warmup=resolve_steps(self.initial_warmup, total_steps, "initial_warmup"),
            interval=max(1, resolve_steps(self.interval, total_steps, "interval")), top_modules=self.top_modules,
        )
        allocator = GrowthAllocator(
            model, schedule=schedule, scorer=SmoothedDeltaGradientScore(self.beta1, self.beta2),
            add_rank=self.step_size, total_steps=total_steps, adapter=adapter,
            warmup_steps=resolve_steps(self.restart_warmup, total_steps, "restart_warmup"),
        )
        set_mean_regularization(allocator, self.orthogonal_form)
        return allocator

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        return [self.allocator(model, total_steps).callback()]


@register_method("increlora", IncreLoRAConfig, "IncreLoRA: start small, grow rank where ΔW⊙∂L/∂ΔW is largest")
class IncreLoRADelta(SlottedLowRankDelta):
    """IncreLoRA: start small, grow rank where ΔW⊙∂L/∂ΔW is largest."""

    preserves_output_at_init = False  # reserves contribute their 1e-5 terms from step 0 (advance learning)

    def __init__(self, config: IncreLoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        max_rank = default_max_rank(config.max_rank, config.target_rank, layer)
        capacity = max(max_rank, config.init_rank) + config.step_size
        super().__init__(config, layer, module_name, capacity=capacity, live=config.init_rank)
        self.lora_E = nn.Parameter(torch.zeros(capacity, 1))
        self.register_buffer("reserve_mask", torch.zeros(capacity, dtype=torch.bool))
        self.register_buffer("trained_since", torch.full((capacity,), -1, dtype=torch.int64))
        self.register_buffer("live_since", torch.full((capacity,), -1, dtype=torch.int64))
        self.register_buffer("alpha", torch.tensor(float(config.alpha), dtype=torch.float64), persistent=False)
        self.max_rank = max_rank
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)  # every slot random: reserves need a, b ~ N(0, 0.02²)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.reserve_mask[config.init_rank:config.init_rank + config.step_size] = True  # reserves of step 0

    def slot_mixer(self) -> Tensor:
        reserve = RESERVE_VALUE if self.config.advance_learning else 0.0
        values = self.lora_E.reshape(-1)
        held = torch.where(self.reserve_mask, torch.full_like(values, reserve), torch.zeros_like(values))
        return torch.where(self.rank_mask, values, held)

    def scale(self) -> Tensor:
        return self.alpha / (self.rank_mask.sum().to(self.alpha.dtype) + 1e-5)

    def used_slot_mask(self) -> Tensor:
        return self.rank_mask | self.reserve_mask

    def component_tensors(self) -> dict[str, tuple[Tensor, int]]:
        return {"lora_A": (self.lora_A, 0), "lora_E": (self.lora_E, 0), "lora_B": (self.lora_B, 1)}

    def live_parameter_count(self) -> int:
        return self.rank * (self.layer.fan_in + self.layer.out_features + 1)

    @torch.no_grad()
    def grow_rank(self, count: int, step: int) -> int:
        """Activate up to `count` reserves (e starts at the reserve value), then create fresh reserves."""
        room = self.max_rank - self.rank
        reserves = torch.nonzero(self.reserve_mask).reshape(-1)[: max(0, min(count, room))]
        if reserves.numel() == 0:
            return 0
        start = RESERVE_VALUE if self.config.advance_learning else 0.0
        self.write_slots(self.lora_E, 0, reserves, torch.full((reserves.numel(), 1), start, dtype=torch.float64))
        if not self.config.advance_learning:  # the code's a, b join the optimizer only now, with e
            self.mark_new_slots(self.lora_A, reserves)
            self.mark_new_slots(self.lora_B, reserves)
            self.trained_since[reserves] = step
        self.rank_mask[reserves], self.reserve_mask[reserves] = True, False
        self.live_since[reserves] = step
        self._create_reserves(step)
        return int(reserves.numel())

    def _create_reserves(self, step: int) -> None:
        free = torch.nonzero(~(self.rank_mask | self.reserve_mask)).reshape(-1)[: self.config.step_size]
        if free.numel() == 0:
            return
        generator = self.slot_generator(self.config.seed, step)
        for parameter, slot_dim in ((self.lora_A, 0), (self.lora_B, 1)):
            shape = self.slot_shape(parameter, slot_dim, free.numel())
            self.write_slots(parameter, slot_dim, free, gaussian(shape, generator, 0.02))
        self.write_slots(self.lora_E, 0, free, torch.zeros(free.numel(), 1))
        self.reserve_mask[free] = True
        self.trained_since[free] = step

    @torch.no_grad()
    def stop_growth(self) -> None:
        self.reserve_mask.zero_()  # the code sets the remaining reserves' e to 0

    def update_factors(self, step: int, warmup_steps: int) -> dict[str, Tensor]:
        rows = _warmup_factor(self.trained_since, step, warmup_steps)
        return {"lora_A": rows, "lora_B": rows, "lora_E": _warmup_factor(self.live_since, step, warmup_steps)}

    def regularization(self) -> Tensor | None:
        if self.config.orthogonal_weight == 0:
            return None
        squared = self.config.orthogonal_form == "paper"
        penalty = orthogonality_penalty(self.lora_A, self.lora_B, self.rank_mask | self.reserve_mask, squared)
        return self.config.orthogonal_weight * self.regularization_share * penalty


def _warmup_factor(since: Tensor, step: int, warmup_steps: int) -> Tensor:
    """Linear warm-up from 0 for slots started at `since` >= 0 (the first update after a start is at 0, as
    with a scheduler whose new group starts its count at the next step); 1 for slots there from the start."""
    if warmup_steps <= 0:
        return torch.ones(since.shape, dtype=torch.float64)
    elapsed = (step - since - 1).to(torch.float64) / warmup_steps
    return torch.where(since >= 0, elapsed.clamp(0.0, 1.0), torch.ones_like(elapsed)).cpu()

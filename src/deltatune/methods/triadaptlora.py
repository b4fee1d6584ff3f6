"""TriAdaptLoRA: triangular split of the transformation matrix and threshold-driven rank growth
(Liang, Wang, Zeng, 2025, arXiv:2501.08008).

    ΔW = (alpha / (R + 1e-5)) · B · C · A,   C = L + U   (R = live rank)

A (R × in) and B (out × R) hold the components; the R × R core C is split into a block-lower-triangular L and
a block-upper-triangular U (separate parameters; diagonal blocks get both), one block per growth event, so
growing appends a row strip to L and a column strip to U and never touches old entries. Importance is the
growth of the normalized Frobenius norm ‖C‖_F / K (K = blocks) since the previous event; at each event
k = ⌊remaining · p⌋ ("linear", the paper's best) or ⌊remaining^p⌋ ("exponential") of the top modules gain
`rank_step` components (`allocate.GrowthAllocator` with `FrobeniusGrowthScore` and
`ThresholdGrowthSchedule`). `regularization()` is the orthogonality penalty on the live A and B.

Saved tensors (per module): ``lora_A`` (capacity, in) — (capacity, in, *kernel) for convolutions —,
``lora_B`` (out, capacity) — (out, capacity, 1, ...) for convolutions —, ``lora_C_lower`` and
``lora_C_upper`` (capacity, capacity), ``rank_mask`` (capacity,) bool, ``slot_block`` (capacity,) int64 (the
growth event that created each slot, −1 = free). A slot pair (i, j) is used by L when block j <= block i and by
U when block i <= block j, both slots live.

The paper body was not available; this follows a peft-fork file that cites the paper (repository unverified),
with its defaults: init_rank 1, target_rank (reference rank) 8, rank_step = target/2, linear growth, no
warm-up, an event every step, γ 0.5 (plain norms averaged), alpha 8 (peft's). Deviations:
- Initialization: that file zeroes B, C and every new block except the first A, which cannot train (every
  factor of B·C·A then has a zero gradient). Here A ~ N(0, 0.02²) and B = 0 (ΔW = 0 at step 0); the first
  core block and each new L row strip ~ N(0, 0.02²); new U column strips start at 0, so a growth event leaves
  ΔW unchanged apart from the code's α/R rescaling.
- Fixed shapes: `max_rank` slots per module (default min(4 × target_rank, in, out)); full modules are skipped.
  A new block's A rows, B columns, L row strip and U column strip get a new parameter's optimizer state
  (moments zeroed, their own Adam step count: `allocate.fresh_state`), as the file's new parameters would.
- Growth never overshoots the target budget (the code counts modules against ranks and can overshoot).
- Layer kinds: every kind (the file has Linear and transformers Conv1D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.growth import FrobeniusGrowthScore, GrowthAllocator
from deltatune.allocate.schedules import GROWTH_RULES, ThresholdGrowthSchedule, resolve_steps
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


@dataclass(frozen=True)
class TriAdaptLoRAConfig(DeltaConfig):
    """TriAdaptLoRA hyper-parameters.

    Args:
        init_rank: live rank per module at the start (one block).
        target_rank: average rank per module at the end (the code's reference rank).
        rank_step: components a chosen module gains per event (None: max(1, target_rank // 2)).
        max_rank: most components one module may hold (None: min(4 × target_rank, in, out)).
        growth: "linear" (k = ⌊remaining·p⌋) or "exponential" (k = ⌊remaining^p⌋).
        initial_warmup, interval: steps before the first event and between events, or shares of training.
        alpha, dropout, orthogonal_weight, orthogonal_form: as in AdaLoRA ("code" form by default here).
        init_std: standard deviation of the Gaussian initializations.
        seed: seeds the initialization of blocks added during training.
    """
    budget_field: ClassVar[str | None] = "target_rank"

    init_rank: int = 1
    target_rank: int = 8
    rank_step: int | None = None
    max_rank: int | None = None
    growth: str = "linear"
    initial_warmup: int | float = 0
    interval: int | float = 1
    alpha: float = 8.0
    dropout: float = 0.0
    orthogonal_weight: float = 0.5
    orthogonal_form: str = "code"
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_growth_ranks(self, "TriAdaptLoRA")
        config_check(self.growth in GROWTH_RULES, "growth", self.growth, f"one of {GROWTH_RULES}")
        check_share_or_steps(self.initial_warmup, "initial_warmup")
        check_share_or_steps(self.interval, "interval")
        config_check(self.interval != 0, "interval", self.interval, "at least one step (or a share > 0)")
        config_check(isinstance(self.init_std, (int, float)) and self.init_std > 0, "init_std", self.init_std,
                     "a number > 0")
        check_common(self)

    @property
    def step_size(self) -> int:
        return self.rank_step if self.rank_step is not None else max(1, self.target_rank // 2)

    def allocator(self, model: nn.Module, total_steps: int) -> GrowthAllocator:
        adapter = adapter_name_of(model, self)
        modules = sum(1 for _ in iter_deltas(model, adapter))
        schedule = ThresholdGrowthSchedule(
            initial_budget=self.init_rank * modules, target_budget=self.target_rank * modules,
            total_steps=total_steps, modules=modules, add_rank=self.step_size,
            initial_warmup=resolve_steps(self.initial_warmup, total_steps, "initial_warmup"),
            interval=max(1, resolve_steps(self.interval, total_steps, "interval")), rule=self.growth,
        )
        allocator = GrowthAllocator(model, schedule=schedule, scorer=FrobeniusGrowthScore(),
                                    add_rank=self.step_size, total_steps=total_steps, adapter=adapter)
        set_mean_regularization(allocator, self.orthogonal_form)
        return allocator

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        return [self.allocator(model, total_steps).callback()]


@register_method("triadaptlora", TriAdaptLoRAConfig, "TriAdaptLoRA: B·(L+U)·A triangular core, threshold rank growth")
class TriAdaptLoRADelta(SlottedLowRankDelta):
    """TriAdaptLoRA: B·(L+U)·A triangular core, threshold rank growth."""

    def __init__(self, config: TriAdaptLoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        capacity = max(default_max_rank(config.max_rank, config.target_rank, layer), config.init_rank)
        super().__init__(config, layer, module_name, capacity=capacity, live=config.init_rank)
        self.lora_C_lower = nn.Parameter(torch.zeros(capacity, capacity))
        self.lora_C_upper = nn.Parameter(torch.zeros(capacity, capacity))
        self.register_buffer("slot_block", torch.full((capacity,), -1, dtype=torch.int64))
        self.register_buffer("alpha", torch.tensor(float(config.alpha), dtype=torch.float64), persistent=False)
        first = slice(0, config.init_rank)
        with torch.no_grad():
            self.lora_A[first].normal_(0.0, config.init_std)
            self.lora_C_lower[first, first].normal_(0.0, config.init_std)
        self.slot_block[first] = 0

    def _core_masks(self) -> tuple[Tensor, Tensor]:
        live = self.rank_mask[:, None] & self.rank_mask[None, :]
        row_block, column_block = self.slot_block[:, None], self.slot_block[None, :]
        return live & (column_block <= row_block), live & (row_block <= column_block)

    def slot_mixer(self) -> Tensor:
        lower, upper = self._core_masks()
        return self.lora_C_lower * lower + self.lora_C_upper * upper

    def scale(self) -> Tensor:
        return self.alpha / (self.rank_mask.sum().to(self.alpha.dtype) + 1e-5)

    def core_matrix(self) -> Tensor:
        return self.slot_mixer().detach()

    @property
    def block_count(self) -> int:
        return int(self.slot_block.max()) + 1 if self.rank > 0 else 0

    def component_tensors(self) -> dict[str, tuple[Tensor, int]]:
        return {"lora_A": (self.lora_A, 0), "lora_B": (self.lora_B, 1),
                "lora_C_lower": (self.lora_C_lower, 0), "lora_C_upper": (self.lora_C_upper, 1)}

    def live_parameter_count(self) -> int:
        lower, upper = self._core_masks()
        core = int(lower.sum()) + int(upper.sum())
        return self.rank * (self.layer.fan_in + self.layer.out_features) + core

    @torch.no_grad()
    def grow_rank(self, count: int, step: int) -> int:
        """Append one block of up to `count` slots: A rows random, B columns 0, L row strip random, U 0."""
        new = torch.nonzero(~self.rank_mask).reshape(-1)[: max(0, count)]
        if new.numel() == 0:
            return 0
        generator = self.slot_generator(self.config.seed, step)
        std = self.config.init_std
        self.write_slots(self.lora_A, 0, new, gaussian(self.slot_shape(self.lora_A, 0, new.numel()), generator, std))
        self.write_slots(self.lora_B, 1, new, torch.zeros(self.slot_shape(self.lora_B, 1, new.numel())))
        rows = gaussian((new.numel(), self.rank_capacity), generator, std)
        self.write_slots(self.lora_C_lower, 0, new, rows)
        self.write_slots(self.lora_C_upper, 1, new, torch.zeros(new.numel(), self.rank_capacity))
        self.slot_block[new] = self.block_count
        self.rank_mask[new] = True
        return int(new.numel())

    def stop_growth(self) -> None:
        """Nothing to switch off: free slots are inert."""

    def regularization(self) -> Tensor | None:
        if self.config.orthogonal_weight == 0:
            return None
        squared = self.config.orthogonal_form == "paper"
        penalty = orthogonality_penalty(self.lora_A, self.lora_B, self.rank_mask, squared)
        return self.config.orthogonal_weight * self.regularization_share * penalty

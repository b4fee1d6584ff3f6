"""CoLoRA-style contribution-based LoRA capacity (after Park, Kim, Chun, ECCV 2024, arXiv:2408.01099).

    ΔW_i = (alpha / rank) · B_i diag(m_i) A_i     (LoRA with a per-layer live rank r_i = |m_i|)

CoLoRA fine-tunes an image-restoration backbone (NAFNet, Restormer) with LoRA whose per-layer capacity δ_i is
set from each layer's contribution to the new task, measured with FAIG (filter attribution by integrated
gradients between pre-trained and task-adapted weights), spending about 7% of the parameters. Its image
restoration setting and the PROD pre-training are out of reach on a CPU, and the paper's δ_i formula could not
be read (no code was released), so this applies the allocation rule to our tasks:

1. every layer trains at the uniform `rank` for the first `probe` share of training, while the allocator
   accumulates each layer's contribution c_i = |Σ_t ⟨∇θ_i L, θ_i,t+1 − θ_i,t⟩|: the FAIG-style path
   integral of the gradient times the parameter change, taken along the path training actually follows (a
   straight-line path between the same end points has the same total, split differently across layers);
2. then the budget rank × #layers is split in proportion to c_i, each layer within [min_rank, max_rank]
   (`allocate.ContributionAllocator`); a layer that shrinks keeps its components with the largest ‖b_j‖·‖a_j‖,
   a layer that grows gets fresh LoRA components (A Kaiming-uniform, B = 0, output unchanged) with a new
   parameter's optimizer state (`allocate.fresh_state`: moments zeroed, their own Adam step count; a dropped
   component's slot is zeroed with its moments); then training goes on with the new ranks (CoLoRA allocates
   before fine-tuning; we keep the probe's progress).

Saved tensors (per module): ``lora_A`` (capacity, in) — (capacity, in, *kernel) for convolutions —,
``lora_B`` (out, capacity) — (out, capacity, 1, ...) for convolutions —, ``rank_mask`` (capacity,) bool.
Embeddings follow peft's LoRA convention (A = 0, B ~ N(0, 1)). The scale is alpha / rank for every layer,
whatever its allocated rank, so re-allocation does not rescale the components that stay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.contribution import ContributionAllocator
from deltatune.allocate.schedules import resolve_steps
from deltatune.allocate.slots import SlottedLowRankDelta, gaussian, kaiming_rows
from deltatune.allocate.support import adapter_name_of, check_common, check_share_or_steps
from deltatune.core.config import DeltaConfig
from deltatune.core.layers import EMBEDDING, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import config_check


@dataclass(frozen=True)
class CoLoRAConfig(DeltaConfig):
    """CoLoRA-style hyper-parameters.

    Args:
        rank: the average rank per layer (budget = rank × #layers) and every layer's rank during the probe.
        max_rank: the most one layer may get (None: 2 × rank); min_rank: the least (>= 1).
        probe: steps (int) or share of training (float) measuring contributions before the one allocation.
        alpha: scale numerator (ΔW = alpha / rank · B A); dropout: on the adapter input.
        seed: seeds the initialization of components added by the allocation.
    """
    budget_field: ClassVar[str | None] = "rank"

    rank: int = 8
    max_rank: int | None = None
    min_rank: int = 1
    probe: int | float = 0.1
    alpha: float = 8.0
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank, "an integer >= 1")
        if self.max_rank is not None:
            config_check(isinstance(self.max_rank, int) and self.max_rank >= self.rank, "max_rank", self.max_rank,
                         f"an integer >= rank={self.rank}, or None")
        config_check(isinstance(self.min_rank, int) and 1 <= self.min_rank <= self.rank, "min_rank",
                     self.min_rank, f"an integer in [1, rank={self.rank}]")
        check_share_or_steps(self.probe, "probe")
        config_check(self.probe != 0, "probe", self.probe, "at least one step (or a share > 0)")
        check_common(self)

    @property
    def capacity(self) -> int:
        return self.max_rank if self.max_rank is not None else 2 * self.rank

    def allocator(self, model: nn.Module, total_steps: int) -> ContributionAllocator:
        return ContributionAllocator(
            model, allocate_at=max(1, resolve_steps(self.probe, total_steps, "probe")), total_steps=total_steps,
            min_rank=self.min_rank, adapter=adapter_name_of(model, self),
        )

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        return [self.allocator(model, total_steps).callback()]


@register_method("colora", CoLoRAConfig, "CoLoRA-style: LoRA whose per-layer rank follows measured contribution")
class CoLoRADelta(SlottedLowRankDelta):
    """CoLoRA-style: LoRA whose per-layer rank follows measured contribution."""

    def __init__(self, config: CoLoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name, capacity=config.capacity, live=config.rank)
        self.register_buffer("scaling", torch.tensor(config.alpha / config.rank, dtype=torch.float64),
                             persistent=False)
        self._initialize(torch.arange(config.rank), None)  # the global RNG at construction, as LoRA

    def _initialize(self, slots: Tensor, generator: torch.Generator | None) -> None:
        """LoRA's init for these slots: A Kaiming-uniform and B = 0 (embeddings: A = 0, B ~ N(0, 1))."""
        count = slots.numel()
        shape_a, shape_b = self.slot_shape(self.lora_A, 0, count), self.slot_shape(self.lora_B, 1, count)
        if self.layer.kind == EMBEDDING:
            down, up = torch.zeros(shape_a), gaussian(shape_b, generator, 1.0)
        else:
            down, up = kaiming_rows(shape_a, generator), torch.zeros(shape_b)
        self.write_slots(self.lora_A, 0, slots, down)
        self.write_slots(self.lora_B, 1, slots, up)

    def slot_mixer(self) -> Tensor:
        return self.rank_mask.to(self.lora_A.dtype)

    def scale(self) -> Tensor:
        return self.scaling

    def component_norms(self) -> Tensor:
        """‖b_j‖·‖a_j‖ per slot: the size of each rank-one piece."""
        down = self.lora_A.detach().reshape(self.rank_capacity, -1).norm(dim=1)
        up = self.lora_B.detach().reshape(self.layer.out_features, self.rank_capacity).norm(dim=0)
        return down * up

    @torch.no_grad()
    def resize_rank(self, rank: int, step: int) -> None:
        """Keep the `rank` largest live components, or add fresh ones in free slots."""
        rank = max(0, min(rank, self.rank_capacity))
        live = torch.nonzero(self.rank_mask).reshape(-1)
        if rank < live.numel():
            norms = self.component_norms()[live]
            order = sorted(range(live.numel()), key=lambda i: (-float(norms[i]), int(live[i])))
            dropped = live[order[rank:]]
            self.rank_mask[dropped] = False
            self.write_slots(self.lora_A, 0, dropped, torch.zeros(self.slot_shape(self.lora_A, 0, dropped.numel())))
            self.write_slots(self.lora_B, 1, dropped, torch.zeros(self.slot_shape(self.lora_B, 1, dropped.numel())))
        elif rank > live.numel():
            new = torch.nonzero(~self.rank_mask).reshape(-1)[: rank - live.numel()]
            self._initialize(new, self.slot_generator(self.config.seed, step))
            self.rank_mask[new] = True

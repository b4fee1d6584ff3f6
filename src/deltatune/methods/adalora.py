"""AdaLoRA: adaptive budget allocation in SVD form (Zhang et al., ICLR 2023, arXiv:2303.10512).

    ΔW = (alpha / (init_rank + 1e-5)) · P diag(λ) Q                            (paper Eq. 3; code's scale)

P (out × r) and Q (r × in) start N(0, 0.02²), λ starts at 0, so ΔW = 0 at step 0. A global budget of live
triplets shrinks from b(0) = Σ init ranks to b(T) = target_rank × #modules on AdaLoRA's cubic schedule; the
least important triplets (sensitivity × uncertainty, Eq. 8–12, combined per triplet by Eq. 9) get λ = 0
(`allocate.SensitivityPruner`). The orthogonality regularizer R = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (Eq. 4) is
returned by `regularization()`, times `orthogonal_weight` (γ).

Saved tensors (per module): ``lora_A`` = Q (r, in) — (r, in, *kernel) for convolutions —, ``lora_E`` = λ
(r, 1), ``lora_B`` = P (out, r) — (out, r, 1, ...) for convolutions —, ``rank_mask`` (r,) bool: the live
triplets chosen by the allocator. Names and shapes are peft's (``rank_mask`` is peft's ``rank_pattern``).

Training: `config.training_callbacks(model, total_steps)` gives the trainer callback; in a plain loop::

    allocator = config.allocator(model, total_steps)
    ...; optimizer.step(); allocator.step(model, global_step); optimizer.zero_grad()

Defaults and deviations:
- init_rank 12, target_rank 8 (peft and the official README), β1 = β2 = 0.85 (paper), γ = 0.1 (official
  README; the paper tunes γ in {0.1, 0.3, 0.5}), alpha 8 (peft's default).
- The regularizer follows the paper (squared norms summed over modules); ``orthogonal_form="code"`` gives the
  official code's and peft's form (plain Frobenius norms averaged over all P and Q tensors).
- The paper's t_i, t_f, ΔT are per-task step counts (Tab. 8); here they also accept shares of training and
  default to 10% / 50% / every 10 steps, close to its GLUE settings (e.g. CoLA: t_i 800, t_f 3500, ΔT 10 of
  about 6,700 steps).
- Layer kinds: Linear, transformers Conv1D and Conv (as peft) plus Embedding (our extension; peft has none).
- The initial budget counts every slot; a target larger than the initial rank is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.pruning import SensitivityPruner
from deltatune.allocate.schedules import resolve_steps
from deltatune.allocate.slots import SlottedLowRankDelta, orthogonality_penalty
from deltatune.allocate.support import (
    adapter_name_of,
    check_common,
    check_share_or_steps,
    set_mean_regularization,
)
from deltatune.core.config import DeltaConfig
from deltatune.core.layers import LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import config_check


@dataclass(frozen=True)
class AdaLoRAConfig(DeltaConfig):
    """AdaLoRA hyper-parameters.

    Args:
        init_rank: r, the slots per module at the start (the paper's initial budget ≈ 1.5 × target).
        target_rank: the average rank per module at the end (b(T) = target_rank × #modules), <= init_rank.
        alpha: scale numerator: ΔW = alpha / init_rank · P diag(λ) Q.
        dropout: dropout on the adapter input, in [0, 1).
        beta1, beta2: EMA factors of sensitivity and uncertainty (paper: 0.85).
        orthogonal_weight: γ of the orthogonality regularizer (0 = off).
        orthogonal_form: "paper" (Eq. 4, squared, summed) or "code" (plain norms averaged, as official/peft).
        initial_warmup, final_warmup: t_i and t_f, in steps (int) or as a share of training (float in [0, 1)).
        mask_interval: ΔT, steps between two masking events in the cubic phase.
    """
    budget_field: ClassVar[str | None] = "init_rank"

    init_rank: int = 12
    target_rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    orthogonal_weight: float = 0.1
    orthogonal_form: str = "paper"
    initial_warmup: int | float = 0.1
    final_warmup: int | float = 0.5
    mask_interval: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(isinstance(self.init_rank, int) and self.init_rank >= 1, "init_rank", self.init_rank,
                     "an integer >= 1")
        config_check(isinstance(self.target_rank, int) and 0 <= self.target_rank <= self.init_rank, "target_rank",
                     self.target_rank, f"an integer in [0, init_rank={self.init_rank}]",
                     "AdaLoRA prunes: the budget cannot be larger than the initial rank")
        check_common(self)
        check_share_or_steps(self.initial_warmup, "initial_warmup")
        check_share_or_steps(self.final_warmup, "final_warmup")
        config_check(isinstance(self.mask_interval, int) and self.mask_interval >= 1, "mask_interval",
                     self.mask_interval, "an integer >= 1")

    def allocator(self, model: nn.Module, total_steps: int) -> SensitivityPruner:
        """The rank allocator for a run of `total_steps` optimizer steps."""
        allocator = SensitivityPruner(
            model, target_rank=self.target_rank, total_steps=total_steps,
            initial_warmup=resolve_steps(self.initial_warmup, total_steps, "initial_warmup"),
            final_warmup=resolve_steps(self.final_warmup, total_steps, "final_warmup"),
            mask_interval=self.mask_interval, beta1=self.beta1, beta2=self.beta2,
            adapter=adapter_name_of(model, self),
        )
        set_mean_regularization(allocator, self.orthogonal_form)
        return allocator

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        return [self.allocator(model, total_steps).callback()]


@register_method("adalora", AdaLoRAConfig, "AdaLoRA: SVD-form P·diag(λ)·Q, sensitivity-pruned to a cubic budget")
class AdaLoRADelta(SlottedLowRankDelta):
    """AdaLoRA: SVD-form P·diag(λ)·Q, sensitivity-pruned to a cubic budget."""

    def __init__(self, config: AdaLoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name, capacity=config.init_rank, live=config.init_rank)
        self.lora_E = nn.Parameter(torch.zeros(config.init_rank, 1))
        scale = config.alpha / (config.init_rank + 1e-5)  # the official code's and peft's ranknum + 1e-5
        self.register_buffer("scaling", torch.tensor(scale, dtype=torch.float64), persistent=False)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def slot_mixer(self) -> Tensor:
        return self.lora_E.reshape(-1)  # masked λ are zero in place, so they can revive (paper §3.3)

    def used_slot_mask(self) -> Tensor:
        return torch.ones_like(self.rank_mask)  # every triplet computes: a pruned λ may come back

    def scale(self) -> Tensor:
        return self.scaling

    def component_tensors(self) -> dict[str, tuple[Tensor, int]]:
        return {"lora_A": (self.lora_A, 0), "lora_E": (self.lora_E, 0), "lora_B": (self.lora_B, 1)}

    def live_parameter_count(self) -> int:
        return self.rank * (self.layer.fan_in + self.layer.out_features + 1)

    @torch.no_grad()
    def prune_components(self, keep: Tensor) -> None:
        keep = keep.to(device=self.rank_mask.device, dtype=torch.bool).reshape(-1)
        self.lora_E.masked_fill_(~keep.reshape(-1, 1), 0.0)
        self.rank_mask.copy_(keep)

    def regularization(self) -> Tensor | None:
        if self.config.orthogonal_weight == 0:
            return None
        squared = self.config.orthogonal_form == "paper"
        penalty = orthogonality_penalty(self.lora_A, self.lora_B, None, squared=squared)
        return self.config.orthogonal_weight * self.regularization_share * penalty

"""ID³: step-by-step unmasking for parameter-efficient fine-tuning (Agarwal, Ramesh, Sengupta, Chakraborty,
TACL 2025, arXiv:2408.14470).

Which entries may change grows during training. Every entry starts masked (frozen); at each step, after backward,
the still-masked entries are scored by D3 = |g| / (|θ| + ε)^e, and the global top-u_t of them (over every adapted
tensor together) are unmasked for good; the gradients of masked entries are then zeroed and the optimizer steps.
u_t follows increment-S: ⌊B/T⌋ per step, one more during the first (B mod T) steps, so B entries are unmasked at
step T. Exploitation = the unmasked entries keep training; exploration = each step adds the currently most
important new ones (a static mask only exploits; re-drawing the mask each step only explores).

Two parametrizations (`parametrization`):
- "weight": a dense update δ (out, fan_in), W' = W0 + δ, masked entry by entry (the paper's main setting);
- "lora": LoRA factors, ΔW = (alpha/r)·B·A, with ID³ unmasking entries of A and B (the paper's "dynamic
  sparsification" of added modules).
Trained tensors start at zero (δ, B, and an offset on A: A = A₀ + ΔA with A₀ the frozen random init), so entries
that were never unmasked stay exactly where they started even under AdamW's decoupled weight decay (the
official wrapper lets decay move masked weights).

Saved tensors per adapted module: "weight": ``delta`` (out, fan_in) and ``mask`` (bool, same shape); "lora":
``lora_A_init``, ``lora_A`` (r, fan_in), ``lora_B`` (out, r), ``mask_A``, ``mask_B`` (bool).

The unmasking runs in the trainer callback `ID3Unmasking` (from `ID3Config.training_callbacks`); outside the
trainer call its `unmask_step()` between `backward()` and `optimizer.step()`.

Deviations: the budget counts entries of the adapted layers (the official wrapper counts every model parameter);
the update δ is dense in memory (gradient and optimizer state of the adapted weights' size: D3 needs every masked
entry's gradient each step anyway), only its mask makes the trained set sparse. The official overflow-trim branch
is replaced by an exact global top-k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.selection import check_budget, d3_scores, resolve_budget
from deltatune.allocate.support import adapter_deltas
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import ALL_KINDS, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, config_check

PARAMETRIZATIONS = ("weight", "lora")


@dataclass(frozen=True)
class ID3Config(DeltaConfig):
    """ID³ hyper-parameters.

    Args:
        budget: B, the entries unmasked by the end of training: a share of the adapted entries in (0, 1) (default
            0.17%, the paper's headline share) or a count (README example: 100000).
        exponent: e in D3 = |g| / (|θ| + ε)^e (official default 0: gradient magnitude).
        eps: ε in D3 (official default 1e-3).
        parametrization: "weight" (mask the weights' update) or "lora" (mask LoRA factors).
        lora_rank, lora_alpha: r and alpha of the "lora" parametrization.
    """
    budget_field: ClassVar[str | None] = "budget"

    budget: float = 0.0017
    exponent: float = 0.0
    eps: float = 1e-3
    parametrization: str = "weight"
    lora_rank: int = 8
    lora_alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.budget, "budget")
        config_check(self.exponent >= 0, "exponent", self.exponent, "a number >= 0")
        config_check(self.eps > 0, "eps", self.eps, "a number > 0")
        config_check(self.parametrization in PARAMETRIZATIONS, "parametrization", self.parametrization,
                     f"one of {PARAMETRIZATIONS}")
        config_check(isinstance(self.lora_rank, int) and self.lora_rank > 0, "lora_rank", self.lora_rank,
                     "an integer > 0")
        config_check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        return [ID3Unmasking(model, self, total_steps)]


@register_method("id3", ID3Config, "ID³: unmask the top-D3 entries step by step (increment-S), weights or LoRA")
class ID3Delta(Delta):
    """ID³: a masked update whose trainable entries grow step by step."""

    kind = DeltaKind.WEIGHT
    layer_kinds = ALL_KINDS

    def __init__(self, config: ID3Config, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        out, fan_in = layer.out_features, layer.fan_in
        if config.parametrization == "weight":
            self.delta = nn.Parameter(torch.zeros(out, fan_in))
            self.register_buffer("mask", torch.zeros(out, fan_in, dtype=torch.bool))
            return
        rank = config.lora_rank
        if rank >= min(out, fan_in):
            raise ConfigError(f"lora_rank={rank} is invalid for {module_name or layer.type_name!r}: expected "
                              f"0 < lora_rank < min(in, out) = {min(out, fan_in)}; lower it or exclude the module")
        init = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(init, a=math.sqrt(5))
        self.register_buffer("lora_A_init", init)
        self.lora_A = nn.Parameter(torch.zeros(rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(out, rank))
        self.register_buffer("mask_A", torch.zeros(rank, fan_in, dtype=torch.bool))
        self.register_buffer("mask_B", torch.zeros(out, rank, dtype=torch.bool))
        self.scale = config.lora_alpha / rank

    def _matrix(self) -> Tensor:
        if self.config.parametrization == "weight":
            return self.delta
        return self.scale * (self.lora_B @ (self.lora_A_init + self.lora_A))

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self.layer.from_matrix(self._matrix()).to(base_weight.dtype)

    def masked_tensors(self, base_weight: Tensor) -> list[tuple[nn.Parameter, Tensor, Tensor]]:
        """(trained tensor, its mask, θ its entries stand for) for D3: θ is the current weight W0 + δ, or the
        current LoRA factor."""
        if self.config.parametrization == "weight":
            current = self.layer.to_matrix(base_weight.detach()) + self.delta.detach()
            return [(self.delta, self.mask, current)]
        return [(self.lora_A, self.mask_A, (self.lora_A_init + self.lora_A).detach()),
                (self.lora_B, self.mask_B, self.lora_B.detach())]


def increment_schedule(budget: int, total_steps: int, step: int) -> int:
    """increment-S: how many entries to unmask at `step` (0-based) so that `budget` are unmasked after
    `total_steps` steps: ⌊B/T⌋, plus one during the first B mod T steps."""
    if step >= total_steps:
        return 0
    return budget // total_steps + (1 if step < budget % total_steps else 0)


class ID3Unmasking:
    """Trainer callback: after backward, unmask the global top-u_t masked entries by D3, then zero the gradients
    of the entries still masked, before the optimizer steps."""

    # D3 scores the current weights W0 + ΔW: a sharded trainer gathers the frozen base for this callback too.
    reads_base_weights = True

    def __init__(self, model: nn.Module, config: ID3Config, total_steps: int, adapter: str | None = None) -> None:
        # adapter `adapter`'s ID³ deltas (default: the adapter `config` was adapted under), with their hosts
        self.pairs = [(model.get_submodule(path), d) for path, d in adapter_deltas(model, config, ID3Delta, adapter)]
        if total_steps < 1:
            raise ConfigError(f"total_steps={total_steps} is invalid: expected >= 1 training step")
        total = sum(mask.numel() for _, mask, _ in self._tensors())
        self.budget = resolve_budget(config.budget, total)
        self.config = config
        self.total_steps = total_steps
        self.steps_done = 0

    def _tensors(self) -> list[tuple[nn.Parameter, Tensor, Tensor]]:
        return [t for host, d in self.pairs for t in d.masked_tensors(host.base_layer.weight)]

    def unmasked(self) -> int:
        return sum(int(mask.sum()) for _, mask, _ in self._tensors())

    @torch.no_grad()
    def unmask_step(self) -> int:
        """Unmask this step's share and mask the gradients; returns how many entries were unmasked now."""
        tensors = self._tensors()
        room = self.budget - sum(int(mask.sum()) for _, mask, _ in tensors)
        count = min(increment_schedule(self.budget, self.total_steps, self.steps_done), room)
        self.steps_done += 1
        if count > 0:
            count = _unmask_global_top(tensors, count, self.config)
        for parameter, mask, _ in tensors:
            if parameter.grad is not None:
                parameter.grad.mul_(mask)
        return count

    def on_backward_end(self, *_: Any, **__: Any) -> None:
        self.unmask_step()

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])


def _unmask_global_top(tensors: list[tuple[nn.Parameter, Tensor, Tensor]], count: int, config: ID3Config) -> int:
    """Set the mask bits of the `count` best masked entries over all tensors (D3 score); returns how many."""
    # Per tensor, its best `count` masked entries; then the best `count` of those candidates overall.
    scores, positions, owners = [], [], []
    for number, (parameter, mask, current) in enumerate(tensors):
        if parameter.grad is None or bool(mask.all()):
            continue
        flat = d3_scores(parameter.grad, current, config.eps, config.exponent).float().reshape(-1)
        best = flat.masked_fill(mask.reshape(-1), -math.inf).topk(min(count, int((~mask).sum())))
        scores.append(best.values.cpu())
        positions.append(best.indices.cpu())
        owners.append(torch.full((best.values.numel(),), number, dtype=torch.int64))
    if not scores:
        return 0
    chosen = torch.cat(scores).topk(min(count, sum(s.numel() for s in scores))).indices
    chosen_positions, chosen_owners = torch.cat(positions)[chosen], torch.cat(owners)[chosen]
    for number in chosen_owners.unique().tolist():
        mask = tensors[number][1]
        picked = chosen_positions[chosen_owners == number].to(mask.device)
        mask.view(-1)[picked] = True
    return int(chosen.numel())


"""SNELLA: kernelized low-rank sparse tuning with bi-level sparsity allocation (Shen et al.; SNELL, NeurIPS 2024,
"Expanding Sparse Tuning for Low Memory Usage"; SNELLA, arXiv:2510.24037).

A sparse update merged from two low-rank matrices through a nonlinear kernel. With A ∈ R^{H×d_in×q/H},
B ∈ R^{H×d_out×q/H} (rows a_{h,j}, b_{h,i}) and fixed coefficients c_h = 0.1·(−1)^h:

    K_ji = Σ_h c_h ‖a_{h,j} − b_{h,i}‖₂                   (SNELL: a difference of distance kernels, rank ≫ q)
    K ← K + α softmax(K / γ) + β                          (SNELLA's mixed kernel; softmax over d_out; α, γ, β trained)
    K_s = K ⊙ 1[|K| among the (1 − s) largest of the layer]     (competition inside the layer, top-k by |K|)
    y = W0 x + K_sᵀ x

The per-layer sparsity s_ℓ comes from the competition across layers (`SNELLAAllocation`, the official
`sparse_allocator.py`): after each backward, I = |θ ⊙ ∇θ| of A and B is smoothed (Ī ← β₁Ī + (1−β₁)I,
Ū ← β₂Ū + (1−β₂)|I − Ī|); at each allocation the kept volume V(t) follows a cubic schedule from
V₀ = Σ(1 − s₀)·n_ℓ to V_T = Σ(1 − s_T)·n_ℓ and is split across layers in proportion to
S_ℓ = mean(ĪŪ)_A + mean(ĪŪ)_B (capped at each layer's size, the rest redistributed); s_ℓ = 1 − V_ℓ / n_ℓ.
Only the low-rank factors (and α, γ, β) are parameters; the dense kernel is recomputed in backward
(gradient checkpointing, as the official module) so it is never kept between forward and backward.

Saved tensors per adapted module: ``in_factors`` (H, fan_in, q/H), ``out_factors`` (H, out, q/H), ``sparsity``
(scalar, the layer's current s_ℓ) and, with `mix`, ``mix_alpha``, ``mix_gamma``, ``mix_beta`` (scalars).

Deviations: factors start random as in the official code, so the output changes at step 0 (the paper's choice;
the classifier head copes). The official DropPath 0.1 and input dropout 0.1 become `dropout` (default 0). The
official code multiplies surviving entries by their detached magnitude; the default here is the 0/1 mask the paper
describes, `magnitude_scaling=True` gives the code's form. Importance is read after backward (the official code
reads it after the optimizer step, one step later).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deltatune.allocate.importance import proportional_ranks, sensitivity, sensitivity_score, smooth_sensitivity
from deltatune.allocate.schedules import CubicBudgetSchedule
from deltatune.allocate.support import adapter_deltas
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import ALL_KINDS, EMBEDDING, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, config_check


@dataclass(frozen=True)
class SNELLAConfig(DeltaConfig):
    """SNELL / SNELLA hyper-parameters.

    Args:
        rank: q, the total width of the factors (released scripts: 32; "SNELL-8/16/32").
        heads: H, the number of distance kernels (official: 2); rank must be a multiple of it.
        kernel_scale: |c_h| (official 0.1).
        mix: SNELLA's mixed kernel (trainable α, γ, β); False gives SNELL's kernel.
        sparsity: s₀, the share of each layer's kernel entries zeroed at the start (SNELLA scripts: 0), or the
            fixed share when `allocate` is False (SNELL FGVC: 0.3).
        target_sparsity: s_T, the average share zeroed at the end of the SNELLA schedule (CUB script: 0.3).
        allocate: run the bi-level competition (SNELLA); False keeps `sparsity` fixed in every layer (SNELL).
        beta1, beta2: EMA factors of importance and uncertainty (official 0.85, 0.85).
        initial_warmup, final_warmup: shares of training before the budget starts to shrink and after it
            reached V_T (released SNELLA scripts: 0, 0).
        allocation_interval: re-allocate every this many steps; 0 = at each epoch end (official).
        dropout: input dropout of the delta branch, in [0, 1).
        magnitude_scaling: keep survivors as K·|K| (official code) instead of K (paper).
        checkpoint: recompute the kernel in backward instead of storing it.
    """
    budget_field: ClassVar[str | None] = "rank"

    rank: int = 32
    heads: int = 2
    kernel_scale: float = 0.1
    mix: bool = True
    sparsity: float = 0.0
    target_sparsity: float = 0.3
    allocate: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    initial_warmup: float = 0.0
    final_warmup: float = 0.0
    allocation_interval: int = 0
    dropout: float = 0.0
    magnitude_scaling: bool = False
    checkpoint: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(isinstance(self.heads, int) and self.heads >= 1, "heads", self.heads, "an integer >= 1")
        config_check(isinstance(self.rank, int) and self.rank >= self.heads and self.rank % self.heads == 0,
                     "rank", self.rank, f"a positive multiple of heads={self.heads}")
        config_check(self.kernel_scale > 0, "kernel_scale", self.kernel_scale, "a number > 0")
        for name in ("sparsity", "target_sparsity", "initial_warmup", "final_warmup", "dropout"):
            config_check(0 <= getattr(self, name) < 1, name, getattr(self, name), "a share in [0, 1)")
        config_check(self.initial_warmup + self.final_warmup < 1, "final_warmup", self.final_warmup,
                     f"initial_warmup + final_warmup < 1 (initial_warmup={self.initial_warmup})")
        config_check(not self.allocate or self.target_sparsity >= self.sparsity, "target_sparsity",
                     self.target_sparsity, f">= sparsity={self.sparsity}: the allocation only shrinks the kept volume",
                     "or set allocate=False for a fixed sparsity")
        for name in ("beta1", "beta2"):
            config_check(0 < getattr(self, name) < 1, name, getattr(self, name), "a factor in (0, 1)")
        config_check(isinstance(self.allocation_interval, int) and self.allocation_interval >= 0,
                     "allocation_interval", self.allocation_interval, "an integer >= 0 (0 = each epoch end)")

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        return [SNELLAAllocation(model, self, total_steps)] if self.allocate else []


@register_method("snella", SNELLAConfig, "SNELL/SNELLA: kernelized low-rank update, top-k sparsified per layer")
class SNELLADelta(Delta):
    """SNELLA: a sparse update merged from two low-rank matrices through a nonlinear kernel."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = ALL_KINDS
    preserves_output_at_init = False

    def __init__(self, config: SNELLAConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        width = config.rank // config.heads
        self.in_factors = nn.Parameter(torch.empty(config.heads, layer.fan_in, width))
        self.out_factors = nn.Parameter(torch.empty(config.heads, layer.out_features, width))
        for factor in (self.in_factors, self.out_factors):  # official init (the fan counts the 3-D shape)
            nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
        signs = torch.tensor([(-1.0) ** h for h in range(config.heads)], dtype=torch.float64)
        self.register_buffer("coefficients", config.kernel_scale * signs, persistent=False)
        self.register_buffer("sparsity", torch.tensor(float(config.sparsity)))
        if config.mix:
            self.mix_alpha = nn.Parameter(torch.ones(()))
            self.mix_gamma = nn.Parameter(torch.ones(()))
            self.mix_beta = nn.Parameter(torch.zeros(()))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def kernel(self) -> Tensor:
        """K (fan_in, out) before sparsification."""
        # (H, fan_in, out); cdist has no half-precision kernels, so bfloat16/float16 factors meet in float32
        wide = torch.promote_types(self.in_factors.dtype, torch.float32)
        distances = torch.cdist(self.in_factors.to(wide), self.out_factors.to(wide))
        kernel = torch.einsum("h,hio->io", self.coefficients.to(distances.dtype), distances)
        if self.config.mix:
            kernel = kernel + self.mix_alpha * torch.softmax(kernel / self.mix_gamma, dim=-1) + self.mix_beta
        return kernel

    def sparse_kernel(self) -> Tensor:
        """K_s: the layer's largest-|K| share (1 − s) kept, the rest zeroed (top-k competition in the layer)."""
        kernel = self.kernel()
        dropped = int(float(self.sparsity) * kernel.numel())
        if dropped == 0:
            return kernel
        magnitude = kernel.detach().abs()
        cut = magnitude.reshape(-1).kthvalue(dropped).values
        keep = magnitude > cut
        return kernel * (magnitude * keep if self.config.magnitude_scaling else keep)

    def _update(self) -> Tensor:
        return self.layer.from_matrix(self.sparse_kernel().T)

    def _branch(self, x: Tensor) -> Tensor:
        return self.layer.op(x, self._update().to(x.dtype if x.is_floating_point() else self.in_factors.dtype), None)

    def forward(self, x: Tensor) -> Tensor:
        x = x if self.layer.kind == EMBEDDING else self.dropout(x)
        if self.config.checkpoint and torch.is_grad_enabled():
            return checkpoint(self._branch, x, use_reentrant=False)
        return self._branch(x)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self._update().to(base_weight.dtype)

    def importance_tensors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.in_factors, self.out_factors

    @property
    def kernel_size(self) -> int:
        return self.layer.fan_in * self.layer.out_features


class SNELLAAllocation:
    """Trainer callback: the bi-level sparsity competition (across layers by importance, inside by |K|).

    Built from the shared allocation pieces: `allocate.importance` (I = |θ ⊙ ∇θ|, its EMA and uncertainty, the
    score ĪŪ), `allocate.schedules.CubicBudgetSchedule` (V(t)) and `proportional_ranks` (the capped split)."""

    def __init__(self, model: nn.Module, config: SNELLAConfig, total_steps: int, adapter: str | None = None) -> None:
        # adapter `adapter`'s SNELLA deltas (default: the adapter `config` was adapted under)
        self.deltas: list[SNELLADelta] = [d for _, d in adapter_deltas(model, config, SNELLADelta, adapter)]
        if total_steps < 1:
            raise ConfigError(f"total_steps={total_steps} is invalid: expected >= 1 training step")
        self.config = config
        self.sizes = {f"{i:06d}": d.kernel_size for i, d in enumerate(self.deltas)}
        total = sum(self.sizes.values())
        self.schedule = CubicBudgetSchedule(
            initial_budget=round((1 - config.sparsity) * total),
            final_budget=round((1 - config.target_sparsity) * total), total_steps=total_steps,
            initial_warmup=round(config.initial_warmup * total_steps),
            final_warmup=round(config.final_warmup * total_steps),
        )
        self.importance: list[list[Tensor]] = []
        self.uncertainty: list[list[Tensor]] = []
        self.step = 0

    def budget(self, step: int) -> int:
        """Kept volume V(t): V₀ during the initial warm-up, cubic decay to V_T, V_T in the final phase."""
        return self.schedule.budget(step)

    @torch.no_grad()
    def update_importance(self) -> None:
        """EMA of I = |θ ⊙ ∇θ| and of its deviation, per factor entry (official `update_ipt`)."""
        if not self.importance:
            self.importance = [[torch.zeros_like(p) for p in d.importance_tensors()] for d in self.deltas]
            self.uncertainty = [[torch.zeros_like(p) for p in d.importance_tensors()] for d in self.deltas]
        for delta, means, deviations in zip(self.deltas, self.importance, self.uncertainty):
            for k, p in enumerate(delta.importance_tensors()):
                if p.grad is None:
                    continue
                current = torch.nan_to_num(sensitivity(p, p.grad))
                means[k], deviations[k] = smooth_sensitivity(current, means[k], deviations[k], self.config.beta1,
                                                             self.config.beta2)

    def layer_scores(self) -> dict[str, float]:
        """S_ℓ = mean(ĪŪ) over A plus over B (0 before any gradient: the split is then uniform)."""
        if not self.importance:
            return {name: 0.0 for name in self.sizes}
        return {name: sum(float(sensitivity_score(m, u).mean()) for m, u in zip(means, deviations))
                for name, means, deviations in zip(self.sizes, self.importance, self.uncertainty)}

    @torch.no_grad()
    def allocate(self, step: int) -> dict[str, int]:
        """Split V(step) across layers ∝ S_ℓ (capped at each layer's size, the rest re-split); set each s_ℓ."""
        volumes = proportional_ranks(self.layer_scores(), self.budget(step), 0, self.sizes)
        for delta, name in zip(self.deltas, self.sizes):
            delta.sparsity.fill_(1 - volumes[name] / self.sizes[name])
        return volumes

    def on_backward_end(self, **_: Any) -> None:
        self.update_importance()

    def on_step_end(self, global_step: int | None = None, **_: Any) -> None:
        self.step = self.step + 1 if global_step is None else int(global_step)
        interval = self.config.allocation_interval
        if interval and self.step % interval == 0:
            self.allocate(self.step)

    def on_epoch_end(self, **_: Any) -> None:
        if self.config.allocation_interval == 0:
            self.allocate(self.step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "importance": self.importance, "uncertainty": self.uncertainty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.importance = [list(t) for t in state["importance"]]
        self.uncertainty = [list(t) for t in state["uncertainty"]]

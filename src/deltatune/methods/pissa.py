"""PiSSA: principal singular values and singular vectors adaptation (Meng, Wang, Zhang, 2024, arXiv:2404.02948).

    W0 = U S Vᵀ,   A = diag(√(S_r / s)) V_rᵀ,   B = U_r diag(√(S_r / s)),   W_res = W0 − s·B A      (paper §3)

A and B start from the top-r singular triplets of W0 (divided by the LoRA scale s = alpha / r as peft does, so
that s·B A is exactly the principal part), train like LoRA, and the residual W_res is the frozen base.

How deltatune keeps the residual: the base weight is NOT rewritten. The delta holds the initial factors (A0, B0)
as frozen buffers and computes ΔW = s·(B A − B0 A0), so the layer computes W0 + ΔW = W_res + s·B A — the same
model, while the model's weights stay the checkpoint's (disable gives W0, merge/unmerge are exact, other adapters
compose, a saved model is the original one). The cost is a frozen rank-r branch beside the trained one (one
rank-2r product on the fused path). Because A0, B0 are recomputed from W0 whenever the adapter is attached, the
saved file holds only ``lora_A`` and ``lora_B`` (peft's names and shapes), exactly what peft saves.

- `svd_iterations=K` is peft's ``pissa_niter_K``: a randomized SVD (`torch.svd_lowrank`, K subspace iterations)
  instead of the full one, seeded by `seed` (peft's is not seeded).
- peft folders with ``init_lora_weights="pissa"`` load as peft loads them (peft recomputes the residual from the
  base it is given); ``pissa_niter_K`` folders are refused (peft's randomized residual cannot be rebuilt).
- `to_plain_lora(model, name)` converts a trained adapter into a plain LoRA of rank 2r against the original base
  (lora_A = [A; A0], lora_B = [B, −B0]; alpha doubled, or × √2 with rsLoRA), as peft's
  `save_pretrained(path_initial_model_for_weight_conversion=...)` does.

The factorization runs in float32 (peft's precision) or in the weight's dtype when that is wider (peft refuses
float64; deltatune computes it in float64). Layers: Linear and transformers Conv1D (peft's), and convolutions
through their (out, in·k) matrix view (deltatune's: peft has no PiSSA for convolutions, so convert those adapters
with `to_plain_lora` before a peft export); no dropout on the frozen branch (it belongs to the base); no ``bias``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.layers import CONV, CONV1D_HF, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import config_check
from deltatune.functional.lowrank import lowrank_delta_weight, lowrank_linear
from deltatune.methods.lora import LoRAConfig, LoRADelta, _fusable


@dataclass(frozen=True)
class PiSSAConfig(LoRAConfig):
    """PiSSA: LoRA's rank, alpha, dropout, rslora, plus

    Args:
        svd_iterations: None for the full SVD (the paper's); K for a randomized SVD with K subspace iterations
            (peft's ``pissa_niter_K``), much faster on large weights.
        seed: seeds the randomized SVD.
    """

    svd_iterations: int | None = None
    seed: int = 0
    peft_init: ClassVar[str] = "pissa"

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.init == "kaiming", "init", self.init,
                     "left at its default (the factors start from W0, not from `init`)")
        config_check(not self.bias, "bias", self.bias, "False (not supported with a residual init)")
        config_check(self.svd_iterations is None or (isinstance(self.svd_iterations, int) and self.svd_iterations >= 0),
                     "svd_iterations", self.svd_iterations, "None (full SVD) or an integer >= 0")

    def to_peft_config(self, target_paths: list[str], extra_paths: list[str]) -> dict[str, Any]:
        config_check(self.svd_iterations is None, "svd_iterations", self.svd_iterations,
                     "None for a peft export (peft rebuilds a pissa_niter residual unseeded)",
                     "convert with deltatune.methods.pissa.to_plain_lora(model) first")
        return super().to_peft_config(target_paths, extra_paths) | {"init_lora_weights": self.peft_init}


def principal_factors(matrix: Tensor, config: PiSSAConfig) -> tuple[Tensor, Tensor]:
    """(A0, B0) of the (out, in) matrix: √(S_r/s) V_rᵀ and U_r √(S_r/s), as peft's `pissa_init`."""
    r = config.rank
    if config.svd_iterations is None:
        left, values, right_t = torch.linalg.svd(matrix, full_matrices=False)
        left, values, right_t = left[:, :r], values[:r], right_t[:r]
    else:
        with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's generator
            torch.manual_seed(config.seed)
            left, values, right = torch.svd_lowrank(matrix, q=r, niter=config.svd_iterations)
        right_t = right.t()
    root = torch.sqrt(values / config.scale)
    return torch.diag(root) @ right_t, left @ torch.diag(root)


@register_method("pissa", PiSSAConfig, "PiSSA: LoRA started from W0's top-r SVD, the residual as the frozen base")
class PiSSADelta(LoRADelta):
    """PiSSA: LoRA started from W0's top-r SVD, the residual as the frozen base."""

    layer_kinds = frozenset({LINEAR, CONV1D_HF, CONV})
    # the frozen initial factors come from W0's SVD at this rank and scale: a swap keeps both
    hot_swappable_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PiSSAConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        # the initial factors: recomputed from W0 at every attach (init_from_base), so not part of the file
        self.register_buffer("lora_A_initial", torch.zeros_like(self.lora_A), persistent=False)
        self.register_buffer("lora_B_initial", torch.zeros_like(self.lora_B), persistent=False)

    @property
    def rank(self) -> int:
        """`HasRank`: ΔW = s·(B A − B0 A0) has rank up to 2r (what a combined or converted LoRA needs)."""
        return 2 * self.config.rank

    def factorize(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        return principal_factors(matrix, self.config)

    @torch.no_grad()
    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        matrix = self.layer.to_matrix(base_weight)
        work = torch.promote_types(matrix.dtype, torch.float32)
        down, up = self.factorize(matrix.to(work))
        for target in (self.lora_A, self.lora_A_initial):
            target.copy_(down.reshape(target.shape))
        for target in (self.lora_B, self.lora_B_initial):
            target.copy_(up.reshape(target.shape))

    def forward(self, x: Tensor) -> Tensor:
        trained = super().forward(x)
        x_in = x.to(self.lora_A.dtype)
        if self.layer.kind == CONV:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.layer.conv_dims - 1]
            frozen = conv(conv(x_in, self.lora_A_initial, **self.layer.conv_args), self.lora_B_initial)
        else:
            frozen = F.linear(F.linear(x_in, self.lora_A_initial), self.lora_B_initial)
        return trained - (frozen * self.scale).to(trained.dtype)

    def forward_with_base(self, x: Tensor, base_layer: nn.Module) -> Tensor | None:
        """One fused rank-2r product: [B, −B0] ([A; A0] x), when no dropout runs and the layer is plain."""
        if self.training and self.config.dropout > 0 or not _fusable(self, x, base_layer):
            return None
        weight = base_layer.weight if self.layer.kind == LINEAR else base_layer.weight.t()
        down = torch.cat([self.lora_A, self.lora_A_initial])
        up = torch.cat([self.lora_B, -self.lora_B_initial], dim=1)
        return lowrank_linear(x, weight, base_layer.bias, down, up, self.config.scale)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        trained = lowrank_delta_weight(self.layer, self.lora_A, self.lora_B, self.scale)
        initial = lowrank_delta_weight(self.layer, self.lora_A_initial, self.lora_B_initial, self.scale)
        return (trained - initial).to(base_weight.dtype)

    @torch.no_grad()
    def assign_delta_weight(self, delta_weight: Tensor) -> None:
        """A, B with s·B A the best rank-r approximation of ΔW + s·B0 A0 (so that ΔW is approximated)."""
        initial = lowrank_delta_weight(self.layer, self.lora_A_initial, self.lora_B_initial, self.scale)
        super().assign_delta_weight(delta_weight + initial.to(delta_weight.dtype))

    def plain_lora_factors(self) -> tuple[Tensor, Tensor]:
        """(lora_A, lora_B) of the rank-2r plain LoRA with the same ΔW at the same scale: [A; A0], [B, −B0]."""
        return (torch.cat([self.lora_A, self.lora_A_initial]).detach(),
                torch.cat([self.lora_B, -self.lora_B_initial], dim=1).detach())


def to_plain_lora(model: nn.Module, name: str = "default") -> nn.Module:
    """Replace PiSSA/OLoRA adapter `name` by a plain LoRA (same name, rank 2r) with the same outputs on the original
    base, peft's conversion: it then saves to peft as a plain LoRA, merges and composes like any LoRA."""
    import deltatune as dt
    from deltatune.core.model import _config_of

    config = _config_of(model, name)
    config_check(isinstance(config, PiSSAConfig), "adapter", name, "a PiSSA or OLoRA adapter")
    factors = {path: delta.plain_lora_factors() for path, _, delta in dt.iter_deltas(model, name)}
    factor = 2 ** 0.5 if config.rslora else 2  # rank 2r at alpha·factor keeps every scale alpha/r (or /√r)
    exact_paths = "|".join(re.escape(path) for path in factors)  # a name list would also match longer paths
    plain = LoRAConfig(rank=2 * config.rank, alpha=config.alpha * factor, dropout=config.dropout,
                       rslora=config.rslora, targets=exact_paths, extra_trainable=config.extra_trainable,
                       rank_pattern={key: 2 * rank for key, rank in config.rank_pattern.items()},
                       alpha_pattern={key: alpha * factor for key, alpha in config.alpha_pattern.items()})
    active = dt.active_adapters(model)
    dt.delete_adapter(model, name)
    dt.adapt(model, plain, name)
    with torch.no_grad():
        for path, _, delta in dt.iter_deltas(model, name):
            delta.lora_A.copy_(factors[path][0])
            delta.lora_B.copy_(factors[path][1])
    dt.set_active(model, list(active))
    return model

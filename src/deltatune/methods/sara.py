"""SaRA: progressive sparse low-rank adaptation (Hu et al., ICLR 2025, arXiv:2409.06633).

The smallest-|w| entries of a pretrained weight are "temporarily ineffective" (paper §3): SaRA re-trains exactly
those entries. Per adapted weight W0 (seen as its (out, fan_in) matrix):

    M = the smallest-|w| share `fraction` of W0's entries (or |W0| < θ with `threshold`)   (paper Eq. 2)
    W = W0 + S,  S = scatter(values at M)  (values start at 0: the model equals the base at step 0)
    L = L_task + λ ‖P ⊙ M‖_*,  P = W0 + S                                                 (paper Eq. 4–5)

As in the official code (its rank-loss candidates are the 2-D parameters with both sides above 64), the nuclear
norm goes to 2-D weights only: Linear, transformers Conv1D, embeddings. Convolution kernels are tuned sparsely but
not penalized unless `nuclear_conv=True` (then as their (out, in/groups · kernel) matrix).

Progressive parameter adjustment (paper §4.3): at `progressive_at` of training (the paper: half) the entries whose
current |w| has left the selection range are frozen at their learned values; the rest keep training.
Unstructural backpropagation (paper §4.4): only the k selected values are parameters, so gradients and optimizer
state have k entries. For Linear and transformers Conv1D the value gradient is a sampled product at the k
positions (`functional.sparse`): no dense weight-sized gradient is ever formed (the official code still forms it
per layer and then indexes it). The layer runs as one fused node ``x (W0 + S)ᵀ + b`` (`forward_with_base`, W0 + S
a transient copy) when the host offers that capability, else as ``base(x) + x Sᵀ`` with sparse products only.
Convolutions and embeddings use the documented denser path: a dense S is built and the layer's own backward forms
its dense gradient transiently, then it is gathered. Merging folds S into W exactly.

Saved tensors per adapted module (all of length k, in position order):
``indices`` (int64 flat positions in the (out, fan_in) matrix view, sorted), ``values`` (the trained update),
``base_values`` (W0 at the positions when selected; kept so re-selection and the penalty see the same weights
after loading), ``frozen_values`` (values fixed by progressive adjustment, 0 before), ``active`` (bool, False
once frozen).

Deviations from the paper, on purpose:
- the trained vector is the update S (not the weights P themselves), so weight decay pulls towards W0, not 0;
- `fraction` (a per-weight share, the paper's "smallest 10–20%" analysis) is the default; the paper's absolute θ
  is `threshold` (θ=2e-3 ≈ 6% of SD1.5); a global share is `allocate.selection.global_magnitude_threshold`;
- only the adapted layers' weights are tuned (the official code also tunes biases and norms: use
  `extra_trainable` for those);
- the official code writes |p| instead of p at start and computes the rank loss on tensors it no longer trains;
  neither bug is reproduced;
- after progressive adjustment, Adam state remains allocated for frozen entries (the paper rebuilds the
  optimizer); the schedule callback clears that state when the trainer exposes its optimizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.selection import below_threshold_positions, smallest_magnitude_positions
from deltatune.allocate.support import adapter_deltas
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import ALL_KINDS, CONV, CONV1D_HF, LINEAR, LayerInfo, base_bias
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, config_check
from deltatune.functional.sparse import (
    PatternCache,
    gather_matrix,
    scatter_matrix,
    sparse_adapted_linear,
    sparse_matmul,
)

NUCLEAR_OF = ("weights", "update")
# The official code skips the rank loss for tensors with 100 selected entries or fewer.
MIN_PENALIZED_ENTRIES = 100


@dataclass(frozen=True)
class SaRAConfig(DeltaConfig):
    """SaRA hyper-parameters.

    Args:
        fraction: share of each target weight's entries to train, the smallest |w| first, in (0, 1).
        threshold: the paper's absolute threshold θ in (0, 1): train every entry with |w| < θ (replaces
            `fraction`). The paper uses 2e-3 (≈50M of SD1.5's 860M parameters), 8e-4 and 2e-4.
        nuclear_weight: λ of the nuclear-norm penalty (README/script default 5e-4; the paper's appendix K study
            picks 5e-3). 0 turns it off.
        nuclear_of: "weights" penalizes ‖P ⊙ M‖_*, the selected entries' current weights (paper Eq. 4);
            "update" penalizes ‖S‖_*, the learned update only.
        nuclear_min_dim: only matrices with min(out, fan_in) above this are penalized (official code: 64).
        nuclear_conv: also penalize convolution kernels, seen as their (out, in/groups * kernel) matrix. Off by
            default, as in the official code, which collects the rank-loss candidates from 2-D weights only
            (Linear, transformers Conv1D, embeddings), so a 4-D conv kernel never gets the nuclear norm.
        progressive_at: share of training after which progressive adjustment re-selects (paper: 0.5);
            None disables it.
        seed: seeds the random choice of the one penalized matrix per step (the official schedule).
        targets, layer_types: by default every Linear, transformers Conv1D and Conv layer ("any model, Linear
            and Conv") except the output head; add "embedding" to `layer_types` to tune embeddings too.
    """
    budget_field: ClassVar[str | None] = "fraction"

    targets: str | tuple[str, ...] | None = None
    layer_types: tuple[str, ...] = (LINEAR, CONV1D_HF, "conv")
    fraction: float = 0.1
    threshold: float | None = None
    nuclear_weight: float = 5e-4
    nuclear_of: str = "weights"
    nuclear_min_dim: int = 64
    nuclear_conv: bool = False
    progressive_at: float | None = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        fix = "use a share such as 0.1 (10% of each weight)"
        config_check(_is_number(self.fraction) and 0 < self.fraction < 1, "fraction", self.fraction,
                     "a share in (0, 1)", fix)
        if self.threshold is not None:
            config_check(_is_number(self.threshold) and 0 < self.threshold < 1, "threshold", self.threshold,
                         "an absolute |w| threshold in (0, 1), e.g. 2e-3", "or leave it None and set fraction")
        config_check(_is_number(self.nuclear_weight) and self.nuclear_weight >= 0, "nuclear_weight",
                     self.nuclear_weight, "a number >= 0 (0 turns the penalty off)")
        config_check(self.nuclear_of in NUCLEAR_OF, "nuclear_of", self.nuclear_of, f"one of {NUCLEAR_OF}")
        config_check(isinstance(self.nuclear_min_dim, int) and self.nuclear_min_dim >= 0, "nuclear_min_dim",
                     self.nuclear_min_dim, "an integer >= 0")
        if self.progressive_at is not None:
            config_check(_is_number(self.progressive_at) and 0 < self.progressive_at < 1, "progressive_at",
                         self.progressive_at, "a share of training in (0, 1), or None to disable",
                         "the paper uses 0.5")
        config_check(isinstance(self.seed, int), "seed", self.seed, "an integer")

    def training_callbacks(self, model: Any, total_steps: int) -> list[Any]:
        return [SaRASchedule(model, self, total_steps)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@register_method("sara", SaRAConfig, "SaRA: re-train the smallest-|w| entries, sparse grads, nuclear norm, PPA")
class SaRADelta(Delta):
    """SaRA: re-train the smallest-|w| entries of each weight as a sparse update."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = ALL_KINDS

    def __init__(self, config: SaRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        self.matrix_shape = (layer.out_features, layer.fan_in)
        self._allocate(0)
        self._patterns = PatternCache()
        # Set by SaRASchedule: only the step's randomly chosen matrix computes the (costly) nuclear norm.
        self.penalized = True

    def _allocate(self, count: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.values = nn.Parameter(torch.zeros(count, device=device, dtype=dtype))
        self.register_buffer("indices", torch.zeros(count, dtype=torch.int64, device=device))
        self.register_buffer("base_values", torch.zeros(count, device=device, dtype=dtype))
        self.register_buffer("frozen_values", torch.zeros(count, device=device, dtype=dtype))
        self.register_buffer("active", torch.ones(count, dtype=torch.bool, device=device))

    @torch.no_grad()
    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        matrix = self.layer.to_matrix(base_weight)
        positions = self._select(matrix)
        self._allocate(positions.numel(), base_weight.device, self.values.dtype)
        self.indices.copy_(positions)
        self.base_values.copy_(gather_matrix(matrix, positions))

    def _select(self, matrix: Tensor) -> Tensor:
        config: SaRAConfig = self.config
        where = self.module_name or self.layer.type_name
        if config.threshold is not None:
            positions = below_threshold_positions(matrix, config.threshold)
            if positions.numel() == 0:
                smallest = float(matrix.abs().min())
                raise ConfigError(
                    f"threshold={config.threshold!r} selects no entry of {where!r} (its smallest |w| is "
                    f"{smallest:.3g}): raise threshold, use fraction instead, or exclude this module"
                )
            return positions
        count = round(config.fraction * matrix.numel())
        if count < 1:
            raise ConfigError(
                f"fraction={config.fraction!r} selects no entry of {where!r} ({matrix.numel()} entries): "
                "raise fraction or exclude this module"
            )
        return smallest_magnitude_positions(matrix, count)

    # --- the update ---------------------------------------------------------------------------------------
    def effective_values(self) -> Tensor:
        """The update at each position: trained values while active, frozen values after adjustment."""
        return torch.where(self.active, self.values, self.frozen_values)

    def forward(self, x: Tensor) -> Tensor:
        values = self.effective_values()
        if self.layer.kind in (LINEAR, CONV1D_HF):
            return sparse_matmul(x, values, self._patterns.get(self.indices, self.matrix_shape))
        # Denser path: the layer's own op on a dense S; its backward forms a transient dense gradient of S.
        dense = self.layer.from_matrix(scatter_matrix(values, self.indices, self.matrix_shape))
        return self.layer.op(x, dense.to(x.dtype) if x.is_floating_point() else dense, None)

    def forward_with_base(self, x: Tensor, base_layer: nn.Module) -> Tensor | None:
        """The whole adapted layer x (W0 + S)ᵀ + b in one op (Linear, Conv1D, Conv; None elsewhere): the host uses
        it when this is the layer's first additive delta. Cheaper than base + x Sᵀ: W0 + S is a transient copy, so
        the layer costs its own forward and backward only. Linear: one autograd node with the sampled value
        gradient. Conv: the conv with W0 + S (index_add's backward gathers the dense kernel gradient at the
        positions), three conv ops instead of the unfused path's five (base, S, and S's two backward convs)."""
        if self.layer.kind == CONV:
            values = self.effective_values().to(base_layer.weight.dtype)
            weight = base_layer.weight.detach().reshape(-1).index_add(0, self.indices, values)
            return self.layer.op(x, weight.view(self.layer.weight_shape), base_bias(base_layer))
        if self.layer.kind not in (LINEAR, CONV1D_HF):
            return None
        weight = self.layer.to_matrix(base_layer.weight)
        pattern = self._patterns.get(self.indices, self.matrix_shape)
        return sparse_adapted_linear(x, weight, base_bias(base_layer), self.effective_values(), pattern)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        dense = scatter_matrix(self.effective_values(), self.indices, self.matrix_shape)
        return self.layer.from_matrix(dense).to(base_weight.dtype)

    # --- training-time behaviour --------------------------------------------------------------------------
    def penalty_eligible(self) -> bool:
        """The official code's rule: a 2-D weight (convolutions only with `nuclear_conv`) whose smaller side
        exceeds `nuclear_min_dim`, with more than MIN_PENALIZED_ENTRIES entries still training."""
        if self.layer.kind == CONV and not self.config.nuclear_conv:
            return False
        return (self.config.nuclear_weight > 0 and min(self.matrix_shape) > self.config.nuclear_min_dim
                and int(self.active.sum()) > MIN_PENALIZED_ENTRIES)

    def regularization(self) -> Tensor | None:
        """λ‖P ⊙ M‖_* over the active entries (paper Eq. 4–5), when this matrix is penalized this step."""
        if not self.penalized or not self.penalty_eligible():
            return None
        update = self.values if self.config.nuclear_of == "update" else self.base_values + self.values
        sparse = torch.where(self.active, update, torch.zeros_like(update))
        matrix = scatter_matrix(sparse, self.indices, self.matrix_shape)
        return self.config.nuclear_weight * torch.linalg.matrix_norm(matrix, ord="nuc")

    def selection_threshold(self) -> float:
        """θ of this weight: the configured threshold, or the largest selected |W0| in fraction mode."""
        if self.config.threshold is not None:
            return self.config.threshold
        return float(self.base_values.abs().max()) if self.base_values.numel() else 0.0

    @torch.no_grad()
    def progressive_adjust(self) -> int:
        """Freeze active entries whose current |W0 + S| left the selection range (paper §4.3); returns how
        many entries stay trainable. Frozen entries keep their learned value."""
        current = (self.base_values + self.values).abs()
        limit = self.selection_threshold()
        still_small = current < limit if self.config.threshold is not None else current <= limit
        leaving = self.active & ~still_small
        self.frozen_values.copy_(torch.where(leaving, self.values, self.frozen_values))
        self.active.copy_(self.active & still_small)
        return int(self.active.sum())


class SaRASchedule:
    """Trainer callback: one random penalized matrix per step, and progressive adjustment at
    `progressive_at` of `total_steps` (then the Adam state of the adapted values is cleared, as the paper
    rebuilds the optimizer). It drives the SaRA deltas of adapter `adapter` (default: the one `config` was
    adapted under) and no others."""

    def __init__(self, model: nn.Module, config: SaRAConfig, total_steps: int, adapter: str | None = None) -> None:
        self.deltas: list[SaRADelta] = [d for _, d in adapter_deltas(model, config, SaRADelta, adapter)]
        self.adjust_step = None if config.progressive_at is None else int(config.progressive_at * total_steps)
        self.adjusted = False
        self._generator = torch.Generator().manual_seed(config.seed)
        self.optimizer: torch.optim.Optimizer | None = None

    def choose_penalized(self) -> SaRADelta | None:
        eligible = [d for d in self.deltas if d.penalty_eligible()]
        pick = int(torch.randint(len(eligible), (), generator=self._generator)) if eligible else -1
        chosen = eligible[pick] if eligible else None
        for delta in self.deltas:
            delta.penalized = delta is chosen
        return chosen

    def adjust_if_due(self, global_step: int) -> bool:
        if self.adjusted or self.adjust_step is None or global_step < self.adjust_step:
            return False
        for delta in self.deltas:
            delta.progressive_adjust()
            if self.optimizer is not None:
                self.optimizer.state.pop(delta.values, None)
        self.adjusted = True
        return True

    def on_step_begin(self, global_step: int, optimizer: torch.optim.Optimizer | None = None, **_: Any) -> None:
        self.optimizer = optimizer if optimizer is not None else self.optimizer
        self.adjust_if_due(global_step)
        self.choose_penalized()

    def state_dict(self) -> dict[str, Any]:
        return {"adjusted": int(self.adjusted), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adjusted = bool(state["adjusted"])
        self._generator.set_state(state["generator"])


"""LoLDU: Lower-Diag-Upper decomposition of the pretrained weight, train the diagonal (Shi et al., 2024,
arXiv:2410.13618).

LU with partial pivoting of each adapted weight W0 (its (out, in) matrix view), written as P L D U:

    W0 = P · L · diag(D) · U        P a row permutation, L unit lower (out × m), U unit upper (m × in),
                                    D = diag of LU's upper factor, m = min(out, in)
    W' = W_res + σ · P L_r diag(z) U_r,   W_res = W0 − σ0 · P L_r diag(D_r) U_r        (paper Fig. 2)

with the first r columns of L, entries of D and rows of U (`rank`). Trainable: z ∈ R^r (init z = D_r, the
paper's "lu" init, so the adapted model equals the base model at step 0) and the scalar σ (init σ0 = alpha / r),
the r + 1 values the paper's Fig. 2 counts. L_r, U_r, D_r and P are frozen.

deltatune never stores W_res: the delta is the difference it makes,

    ΔW = P L_r diag(σ z − σ0 D_r) U_r,   y = x W0ᵀ + b + permute_rows( ((x U_rᵀ) ⊙ (σ z − σ0 D_r)) L_rᵀ )

run on the activation path (2 r (in + out) multiply-adds per token; never a dense ΔW in forward). ΔW does not
depend on W0, so merge adds it and unmerge subtracts it (exact up to float rounding).

P is an index permutation (``loldu_rows``, int64, out entries): row i of W0 is row ``loldu_rows[i]`` of L D U.
It is derived from LAPACK's pivot swaps; no dense out × out matrix is formed (the official code stores P dense).
The LU runs in float64 whatever the base dtype, then the factors are cast to it.

Near-zero pivots: U = (upper factor) / D divides by the pivots. A pivot among the first r with |D_k| below
``pivot_tolerance · max|D|`` is refused by name (``near_zero_pivots="refuse"``, the default), or, with
``"floor"``, replaced by ``±pivot_tolerance · max|D|`` in both D_r and the division, which keeps
L_r diag(D_r) U_r (so the init and the residual) exactly as the LU gives them; only z's starting value and U_r's
scale change on those rows.

Saved tensors per adapted module: ``loldu_diagonal`` (r,) z, ``loldu_scale`` () σ, ``loldu_lower`` (out, r) L_r,
``loldu_upper`` (r, in) U_r, ``loldu_pivots`` (r,) D_r (the values the residual subtracts), ``loldu_rows`` (out,)
int64 P. The frozen factors are saved so an adapter reloads on exactly the factors it was trained on.

Defaults and deviations:
- rank None = full rank min(out, in), the paper's ViT and LLaMA settings (r = 768, r = 1024 = the full width);
  alpha None = rank, so σ0 = 1 (the paper sets α = r in every reported run; the official helper's own default
  α = 1 with r = 4 gives σ0 = 0.25).
- `train_scale=True` trains σ, as the paper's Fig. 2 counts it; the official code's optimizer helper leaves σ out
  (`train_scale=False` reproduces that).
- `init`: "lu" (z = D_r, the paper's default) or the paper's ablation inits "constant" (mean D_r) and "uniform"
  (U(−|mean D_r|/2, |mean D_r|/2), the ablation's best, drawn from torch's global generator); with those two the
  output changes at step 0, because the residual still subtracts D_r (as in the official code).
- Linear and transformers Conv1D only: the paper adapts linear layers; the official conv constructor runs a
  batched LU on the 4-D kernel, which is not a convolution's decomposition, so convolutions and embeddings are
  refused rather than reshaped.
- The official code builds a dropout that its forward never applies; deltatune has no dropout.
- At full rank the frozen L_r and U_r take about twice the weight's memory (the official code keeps them too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import CONV1D_HF, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, config_check

INITS = ("lu", "constant", "uniform")
PIVOT_POLICIES = ("refuse", "floor")


@dataclass(frozen=True)
class LoLDUConfig(DeltaConfig):
    """LoLDU hyper-parameters.

    Args:
        rank: r, how many leading LDU components carry a trainable diagonal entry (1 ≤ r ≤ min(in, out));
            None (the default) = all of them, the paper's setting.
        alpha: σ0 = alpha / r, the initial scale; None = r (σ0 = 1, the paper's runs).
        train_scale: also train the scalar σ (the paper's r + 1 values); False = the official code's optimizer.
        init: z's start: "lu" (D_r: the base output exactly), "constant" (mean D_r) or "uniform" (±|mean D_r|/2).
        near_zero_pivots: "refuse" a pivot below tolerance among the first r, or "floor" it (see the module doc).
        pivot_tolerance: the relative threshold: |D_k| < pivot_tolerance · max|D| is near zero.
    """

    # The paper's point is its natural budget (full rank: min(in, out) + 1 numbers per layer, far below LoRA rank 1's
    # in + out), so there is no knob for budget matching to turn; sweep `rank` directly.
    budget_field: ClassVar[str | None] = None

    rank: int | None = None
    alpha: float | None = None
    train_scale: bool = True
    init: str = "lu"
    near_zero_pivots: str = "refuse"
    pivot_tolerance: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.rank is None or self.rank > 0, "rank", self.rank, "an integer > 0, or None (full rank)")
        config_check(self.alpha is None or self.alpha > 0, "alpha", self.alpha, "a number > 0, or None (= rank)")
        config_check(self.init in INITS, "init", self.init, f"one of {INITS}")
        config_check(self.near_zero_pivots in PIVOT_POLICIES, "near_zero_pivots", self.near_zero_pivots,
                     f"one of {PIVOT_POLICIES}")
        config_check(0 < self.pivot_tolerance < 1, "pivot_tolerance", self.pivot_tolerance, "a number in (0, 1)")

    def rank_for(self, layer: LayerInfo) -> int:
        return min(layer.in_features, layer.out_features) if self.rank is None else self.rank

    def initial_scale(self, rank: int) -> float:
        return 1.0 if self.alpha is None else self.alpha / rank


@register_method("loldu", LoLDUConfig, "LoLDU: LU of W0 (P L D U), train the diagonal of the top-r LDU part")
class LoLDUDelta(Delta):
    """LoLDU: LU of W0 (P L D U), train the diagonal of the top-r LDU part."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = frozenset({LINEAR, CONV1D_HF})

    def __init__(self, config: LoLDUConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        r = config.rank_for(layer)
        limit = min(layer.in_features, layer.out_features)
        config_check(r <= limit, "rank", r, f"1 <= rank <= min(in, out) = {limit} for {module_name or layer.type_name}"
                     f" ({layer.in_features} -> {layer.out_features})", "lower the rank, or None for full rank")
        self.loldu_diagonal = nn.Parameter(torch.zeros(r))
        scale = torch.tensor(config.initial_scale(r))
        if config.train_scale:
            self.loldu_scale = nn.Parameter(scale)
        else:
            self.register_buffer("loldu_scale", scale)
        self.register_buffer("loldu_lower", torch.zeros(layer.out_features, r))
        self.register_buffer("loldu_upper", torch.zeros(r, layer.in_features))
        self.register_buffer("loldu_pivots", torch.zeros(r))
        self.register_buffer("loldu_rows", torch.arange(layer.out_features))
        # σ0 in float64 so float64 models cancel exactly at init; `adapt` casts it with the other tensors
        self.register_buffer("initial_scale", torch.tensor(config.initial_scale(r), dtype=torch.float64),
                             persistent=False)

    @property
    def rank(self) -> int:
        """`HasRank`: the number of trained diagonal entries."""
        return self.loldu_diagonal.numel()

    @torch.no_grad()
    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        rows, lower, pivots, upper = ldu_factors(self.layer.to_matrix(base_weight).double())
        r = self.rank
        pivots = self._guarded(pivots[:r], pivots)
        self.loldu_rows.copy_(rows)
        self.loldu_lower.copy_(lower[:, :r])
        self.loldu_upper.copy_(upper[:r] / pivots[:, None])
        self.loldu_pivots.copy_(pivots)
        self.loldu_diagonal.copy_(self._initial_diagonal(pivots))

    def _guarded(self, leading: Tensor, pivots: Tensor) -> Tensor:
        """The first r pivots, with near-zero ones refused or floored (config.near_zero_pivots)."""
        largest = float(pivots.abs().max())
        floor = self.config.pivot_tolerance * (largest if largest > 0 else 1.0)
        small = leading.abs() < floor
        if not small.any():
            return leading
        if self.config.near_zero_pivots == "refuse":
            k = int(small.nonzero()[0])
            raise ConfigError(
                f"loldu on {self.module_name or self.layer.type_name}: LU pivot {k} of its weight is "
                f"{float(leading[k]):.3g}, below pivot_tolerance · max|pivot| = {floor:.3g} (the weight is nearly "
                f"rank-deficient), so U = upper / D would blow up; use rank <= {k}, or near_zero_pivots='floor'"
            )
        signs = torch.where(leading < 0, -1.0, 1.0).to(leading.dtype)
        return torch.where(small, signs * floor, leading)

    def _initial_diagonal(self, pivots: Tensor) -> Tensor:
        if self.config.init == "lu":
            return pivots
        mean = pivots.mean()
        if self.config.init == "constant":
            return torch.full_like(pivots, float(mean))
        half = float(mean.abs()) / 2
        return torch.empty_like(pivots).uniform_(-half, half)

    def coefficients(self) -> Tensor:
        """σ z − σ0 D_r: the diagonal of the change (0 at the "lu" init)."""
        return self.loldu_scale * self.loldu_diagonal - self.initial_scale * self.loldu_pivots

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.linear(x.to(self.loldu_upper.dtype), self.loldu_upper) * self.coefficients()
        permuted = F.linear(hidden, self.loldu_lower)  # rows in L D U order
        return permuted.index_select(-1, self.loldu_rows).to(x.dtype)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        change = (self.loldu_lower * self.coefficients()) @ self.loldu_upper
        return self.layer.from_matrix(change.index_select(0, self.loldu_rows)).to(base_weight.dtype)


def ldu_factors(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows, L, D, upper) with matrix = (L diag(D) U)[rows] and U = upper / D[:, None]: LU with partial pivoting,
    P as an index vector. L is unit lower (out × m), `upper` LU's upper factor (m × in) with diagonal D."""
    factors, pivots = torch.linalg.lu_factor(matrix)
    m = min(matrix.shape)
    lower = factors[:, :m].tril(-1) + torch.eye(matrix.shape[0], m, dtype=matrix.dtype, device=matrix.device)
    upper = factors[:m].triu()
    return rows_from_pivots(pivots, matrix.shape[0]), lower, upper.diagonal().clone(), upper


def rows_from_pivots(pivots: Tensor, size: int) -> Tensor:
    """LAPACK's pivots (1-based: step i swapped rows i and pivots[i]) as `rows`: row i of the factored matrix is
    row rows[i] of L U. The swaps give LU's row order (`order`, LU = matrix[order]); rows inverts it."""
    order = list(range(size))
    for step, target in enumerate((pivots - 1).tolist()):
        order[step], order[target] = order[target], order[step]
    order_tensor = torch.tensor(order, device=pivots.device)
    return torch.empty_like(order_tensor).scatter_(0, order_tensor, torch.arange(size, device=pivots.device))

"""Truncated SVD of weight deltas: rank rules, the √σ split into LoRA factors, and exact resizing of (A, B) pairs.

Pure tensor functions under `deltatune.merging.extract` (LoRA extraction from a full fine-tune) and
`deltatune.merging.resize` (re-ranking an existing LoRA). Conventions are peft's: ΔW ≈ B A with A (r, in) and
B (out, r), scale 1 (lora_alpha = r), as `mergekit-extract-lora` writes them.

- **Eckart–Young–Mirsky**: with ΔW = U Σ Vᵀ (σ₁ ≥ σ₂ ≥ …), U_r Σ_r V_rᵀ is the best rank-r approximation in the
  Frobenius norm, and its error is ‖ΔW − U_r Σ_r V_rᵀ‖_F = sqrt(Σ_{i>r} σ_i²). Every reported error comes from this.
- **Split** (mergekit's default `--distribute-scale`): B = U_r diag(√σ), A = diag(√σ) V_rᵀ, so both factors carry
  the same spectrum. mergekit's `--no-distribute-scale` (A = Σ_r V_rᵀ, B = U_r) is `split="left"` here.
- **Resize** without forming ΔW: B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), so s·B A = Q_B (s R_B R_Aᵀ) Q_Aᵀ; the SVD of
  the small core s R_B R_Aᵀ = U' Σ V'ᵀ (r × r) gives the exact SVD of the product, U = Q_B U', V = Q_A V'.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import ConfigError, config_check

SPLITS = ("sqrt", "left")
SOLVERS = ("full", "randomized")
OVERSAMPLING = 10  # Halko, Martinsson & Tropp (2011) §4.2: p = 5-10 extra columns make the range finder reliable
POWER_ITERATIONS = 2  # their §4.5 subspace iterations (torch.svd_lowrank's default niter=2)


@dataclass(frozen=True)
class RankRule:
    """How many singular directions a layer keeps. Exactly one of `rank`, `energy`, `sv_ratio`.

    Args:
        rank: a fixed rank r (capped per layer at min(out, in), as mergekit caps it).
        energy: the smallest r with Σ_{i≤r} σ_i² ≥ energy · Σ_i σ_i² (0 < energy ≤ 1): the fraction of ‖ΔW‖_F² kept.
            kohya's `sv_fro` target t is the same rule with energy = t².
        sv_ratio: keep the σ_i with σ_i ≥ σ₁ / sv_ratio (sv_ratio ≥ 1; kohya sd-scripts' `sv_ratio` rule).
        max_rank: an upper bound on the adaptive rules' rank (kohya's `new_rank` with a dynamic method).
    """

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("rank", "energy", "sv_ratio") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one of rank, energy, sv_ratio (got {given or 'none'}); e.g. rank=16 "
                              "or energy=0.9")
        if self.rank is not None:
            config_check(_is_int(self.rank) and self.rank > 0, "rank", self.rank, "an integer > 0")
            config_check(self.max_rank is None, "max_rank", self.max_rank, "unset with a fixed rank",
                         "pass only rank")
        if self.energy is not None:
            config_check(_is_number(self.energy) and 0 < self.energy <= 1, "energy", self.energy,
                         "a fraction in (0, 1] of the squared Frobenius norm to keep")
        if self.sv_ratio is not None:
            config_check(_is_number(self.sv_ratio) and self.sv_ratio >= 1, "sv_ratio", self.sv_ratio,
                         "a number >= 1 (keep σ_i >= σ_1 / sv_ratio)")
        if self.max_rank is not None:
            config_check(_is_int(self.max_rank) and self.max_rank > 0, "max_rank", self.max_rank, "an integer > 0")

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        rule = f"energy {self.energy}" if self.energy is not None else f"sv_ratio {self.sv_ratio}"
        return rule + (f", max rank {self.max_rank}" if self.max_rank is not None else "")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def choose_rank(values: Tensor, rule: RankRule) -> int:
    """The rank `rule` keeps for the singular values `values` (descending, ≥ 0); 0 only when all are 0."""
    count = values.numel()
    if count == 0 or float(values[0]) == 0.0:
        return 0
    if rule.rank is not None:
        return min(rule.rank, count)
    if rule.energy is not None:
        squares = values.double().square()
        cumulative = squares.cumsum(0)
        # smallest r with cumulative[r-1] >= energy·total; the relative tolerance absorbs the rounding of the sum,
        # so energy=1 keeps exactly the non-zero directions' count at most, never more than `count`
        threshold = rule.energy * float(cumulative[-1]) * (1 - 1e-12)
        rank = int(torch.searchsorted(cumulative, torch.tensor([threshold], dtype=cumulative.dtype))[0]) + 1
    else:
        rank = int((values >= values[0] / rule.sv_ratio).sum())
    rank = min(rank, count)
    return min(rank, rule.max_rank) if rule.max_rank is not None else rank


@dataclass(frozen=True)
class LayerFit:
    """One layer's truncated factors and what they leave out (errors from the spectrum, Eckart–Young)."""

    down: Tensor  # A (r, in)
    up: Tensor  # B (out, r)
    rank: int
    full_rank: int  # min(out, in)
    norm: float  # ‖ΔW‖_F
    error: float  # ‖ΔW − B A‖_F = sqrt(Σ_{i>r} σ_i²)

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0

    @property
    def energy_kept(self) -> float:
        return 1.0 - self.relative_error**2 if self.norm > 0 else 1.0


def split_factors(left: Tensor, values: Tensor, right_t: Tensor, rank: int, split: str = "sqrt"
                  ) -> tuple[Tensor, Tensor]:
    """(A, B) of rank `rank` from an SVD U, σ, Vᵀ: √σ on each side ("sqrt", mergekit's default) or σ on A ("left")."""
    config_check(split in SPLITS, "split", split, f"one of {SPLITS}")
    head = values[:rank]
    if split == "sqrt":
        root = head.sqrt()
        return root[:, None] * right_t[:rank], left[:, :rank] * root
    return head[:, None] * right_t[:rank], left[:, :rank].clone()


def _fit_from_svd(left: Tensor, values: Tensor, right_t: Tensor, rule: RankRule, split: str) -> LayerFit:
    rank = choose_rank(values, rule)
    squares = values.double().square()
    norm = float(squares.sum().sqrt())
    error = float(squares[rank:].sum().sqrt())
    down, up = split_factors(left, values, right_t, rank, split)
    return LayerFit(down, up, rank, values.numel(), norm, error)


def truncated_factors(delta: Tensor, rule: RankRule, *, compute_dtype: torch.dtype = torch.float32,
                      split: str = "sqrt", solver: str = "full", seed: int = 0) -> LayerFit:
    """The rank-`rule` factors of one (out, in) delta. Factors are returned in `compute_dtype`.

    solver="full": a full thin SVD (`torch.linalg.svd`), exact up to the compute dtype's rounding (mergekit's, in
    float32). solver="randomized": `torch.svd_lowrank` with q = r + `OVERSAMPLING` columns and `POWER_ITERATIONS`
    power iterations (Halko et al. 2011), seeded; it needs a fixed rank or `max_rank` (the r it can see), its
    σ beyond q are unknown, so the energy rule uses ‖ΔW‖_F² as the total and the error is measured directly,
    ‖ΔW − B A‖_F (not the tail formula, which only holds for the exact SVD)."""
    if delta.ndim != 2:
        raise ConfigError(f"truncated_factors needs a 2-D (out, in) matrix, got shape {tuple(delta.shape)}")
    config_check(solver in SOLVERS, "solver", solver, f"one of {SOLVERS}")
    matrix = delta.to(compute_dtype)
    if solver == "full":
        left, values, right_t = torch.linalg.svd(matrix, full_matrices=False)
        return _fit_from_svd(left, values, right_t, rule, split)
    return _randomized_fit(matrix, rule, split, seed)


def _randomized_fit(matrix: Tensor, rule: RankRule, split: str, seed: int) -> LayerFit:
    cap = rule.rank if rule.rank is not None else rule.max_rank
    if cap is None:
        raise ConfigError("solver='randomized' needs rank= or max_rank= (it computes only the top r + "
                          f"{OVERSAMPLING} singular directions); pass one, or use solver='full'")
    full_rank = min(matrix.shape)
    columns = min(cap + OVERSAMPLING, full_rank)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator
        torch.manual_seed(seed)
        left, values, right = torch.svd_lowrank(matrix, q=columns, niter=POWER_ITERATIONS)
    norm = float(matrix.double().square().sum().sqrt())
    if rule.energy is not None:  # the total energy is ‖ΔW‖_F², known exactly; the seen part is the top q
        squares = values.double().square().cumsum(0)
        reached = (squares >= rule.energy * norm**2 * (1 - 1e-12)).nonzero()
        rank = int(reached[0]) + 1 if reached.numel() else columns
        rank = min(rank, cap)
    else:
        rank = choose_rank(values, dataclasses.replace(rule, max_rank=cap) if rule.rank is None else rule)
    down, up = split_factors(left, values, right.T, rank, split)
    error = float((matrix - up @ down).double().square().sum().sqrt())
    return LayerFit(down, up, rank, full_rank, norm, error)


def resized_factors(down: Tensor, up: Tensor, scale: float, rule: RankRule, *,
                    compute_dtype: torch.dtype = torch.float64, split: str = "sqrt") -> LayerFit:
    """Re-rank ΔW = scale · B A (A (r, in), B (out, r)) exactly, without forming the (out, in) product.

    Thin QR of B and Aᵀ, SVD of the r × r core (see the module docstring); the result has scale 1. The reported
    norm and error are those of ΔW itself (exact: the core has the same singular values)."""
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise ConfigError(f"resized_factors needs A (r, in) and B (out, r) with the same r; got A "
                          f"{tuple(down.shape)} and B {tuple(up.shape)}")
    q_up, r_up = torch.linalg.qr(up.to(compute_dtype))
    q_down, r_down = torch.linalg.qr(down.to(compute_dtype).T)
    core = scale * (r_up @ r_down.T)
    core_left, values, core_right_t = torch.linalg.svd(core, full_matrices=False)
    left, right_t = q_up @ core_left, core_right_t @ q_down.T
    return _fit_from_svd(left, values, right_t, rule, split)

"""Importance estimators: pure functions on tensors (no modules, no state), tested against hand-computed values.

| estimator | used by | formula |
| --- | --- | --- |
| `sensitivity` | AdaLoRA | I = \\|θ ⊙ ∇θ\\| (paper Eq. 8) |
| `smooth_sensitivity` | AdaLoRA, IncreLoRA | Ī ← β1 Ī + (1−β1) I; Ū ← β2 Ū + (1−β2) \\|I − Ī\\| (Eq. 10–11) |
| `sensitivity_score` | AdaLoRA, IncreLoRA | s = Ī · Ū (Eq. 12) |
| `component_importance` | AdaLoRA | S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) (Eq. 9) |
| `delta_gradient_score` | IncreLoRA | σ = Σ \\|ΔW ⊙ ∂L/∂ΔW\\| / √(d_out·d_in) (official code) |
| `normalized_frobenius` | TriAdaptLoRA | n = ‖C‖_F / K, K = number of blocks (official code) |
| `path_contribution` | CoLoRA-style | c = \\|Σ_t ⟨∇θ L_t, θ_{t+1} − θ_t⟩\\| per layer (FAIG-like, see colora.py) |
| `integrated_gradient_contribution` | CoLoRA-style | c = \\|⟨θ_end − θ_start, mean_k ∇L(θ_k)⟩\\| (FAIG's Riemann sum) |
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from deltatune.errors import ConfigError


def sensitivity(parameter: Tensor, gradient: Tensor) -> Tensor:
    """|θ ⊙ ∇θ|: the first-order estimate of the loss change if the entry were zeroed (AdaLoRA Eq. 8)."""
    return (parameter.detach() * gradient.detach()).abs()


def smooth_sensitivity(
    current: Tensor, average: Tensor, uncertainty: Tensor, beta1: float, beta2: float
) -> tuple[Tensor, Tensor]:
    """One EMA step (AdaLoRA Eq. 10–11): the new average, then the uncertainty measured against that new
    average (both official code and peft use the updated Ī)."""
    new_average = beta1 * average + (1 - beta1) * current
    new_uncertainty = beta2 * uncertainty + (1 - beta2) * (current - new_average).abs()
    return new_average, new_uncertainty


def sensitivity_score(average: Tensor, uncertainty: Tensor) -> Tensor:
    """s = Ī · Ū (AdaLoRA Eq. 12): large when an entry is both sensitive and still uncertain."""
    return average * uncertainty


def slot_means(score: Tensor, slot_dim: int) -> Tensor:
    """Mean of an entry-wise score over every dimension except the slot dimension -> (capacity,)."""
    moved = score.movedim(slot_dim, 0)
    return moved.reshape(moved.shape[0], -1).mean(dim=1)


def component_importance(scores: Iterable[tuple[Tensor, int]]) -> Tensor:
    """AdaLoRA Eq. 9 generalized: the sum over a component's tensors of the mean entry score of its slice.

    For P (out×r), λ (r×1), Q (r×in) this is s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)."""
    total: Tensor | None = None
    for score, slot_dim in scores:
        part = slot_means(score, slot_dim)
        total = part if total is None else total + part
    if total is None:
        raise ConfigError("component_importance needs at least one (score, slot_dim) pair")
    return total


def delta_gradient_score(delta_matrix: Tensor, delta_gradient: Tensor) -> Tensor:
    """IncreLoRA's module score: Σ |ΔW ⊙ ∂L/∂ΔW| / √(numel) (official code's backward hook; the paper
    body was not available). ΔW includes the method's scale, as the hooked matrix does in the code."""
    product = (delta_matrix.detach() * delta_gradient.detach()).abs().sum()
    return product / math.sqrt(delta_matrix.numel())


def normalized_frobenius(core: Tensor, blocks: int) -> Tensor:
    """TriAdaptLoRA's normalized Frobenius norm ‖C‖_F / K of the triangular core over its K blocks."""
    if blocks < 1:
        raise ConfigError(f"blocks={blocks} is invalid: a core has at least one block")
    return torch.linalg.matrix_norm(core.detach(), ord="fro") / blocks


def path_contribution(gradients: Sequence[Tensor], displacements: Sequence[Tensor]) -> Tensor:
    """|Σ_k ⟨g_k, Δθ_k⟩| for one layer's tensors: the loss change credited to that layer along the path the
    parameters took (a line integral of the gradient, first order per step). Absolute value as in FAIG."""
    if len(gradients) != len(displacements):
        raise ConfigError("path_contribution needs one displacement per gradient")
    total = torch.zeros((), dtype=torch.float64)
    for gradient, displacement in zip(gradients, displacements):
        total = total + (gradient.detach().double() * displacement.detach().double()).sum().cpu()
    return total.abs()


def integrated_gradient_contribution(start: Tensor, end: Tensor, path_gradients: Sequence[Tensor]) -> Tensor:
    """FAIG-style straight-line attribution |⟨θ_end − θ_start, mean_k ∇L(θ_k)⟩|, where `path_gradients` are
    gradients taken at points θ_k = θ_start + α_k (θ_end − θ_start) (a Riemann sum of the path integral)."""
    if not path_gradients:
        raise ConfigError("integrated_gradient_contribution needs at least one gradient along the path")
    mean_gradient = torch.stack([g.detach().double() for g in path_gradients]).mean(dim=0)
    return ((end.detach().double() - start.detach().double()) * mean_gradient).sum().abs()


def proportional_ranks(
    scores: Mapping[str, float], total: int, minimum: int, maximum: Mapping[str, int]
) -> dict[str, int]:
    """Split `total` rank units over modules in proportion to their scores (negative counts as 0), each
    within [minimum, maximum[name]]: largest-remainder rounding (ties broken by name), and modules whose share
    exceeds their maximum are fixed there while the rest is re-split. All-zero scores share equally."""
    names = sorted(scores)
    if total < minimum * len(names) or total > sum(maximum[n] for n in names):
        raise ConfigError(
            f"total={total} rank units cannot be split over {len(names)} modules with ranks in "
            f"[{minimum}, their maximum] (at most {sum(maximum[n] for n in names)} in all)"
        )
    fixed: dict[str, int] = {}
    free = list(names)
    while True:
        ranks = _largest_remainder({n: max(float(scores[n]), 0.0) for n in free},
                                   total - sum(fixed.values()), minimum)
        over = [n for n in free if ranks[n] > maximum[n]]
        if not over:
            return {n: {**fixed, **ranks}[n] for n in names}
        for name in over:
            fixed[name] = maximum[name]
            free.remove(name)


def _largest_remainder(weights: Mapping[str, float], budget: int, minimum: int) -> dict[str, int]:
    extra = budget - minimum * len(weights)
    mass = sum(weights.values())
    ideal = {n: extra * (w / mass if mass > 0 else 1 / len(weights)) for n, w in weights.items()}
    ranks = {n: minimum + math.floor(ideal[n]) for n in weights}
    left = budget - sum(ranks.values())
    for name in sorted(weights, key=lambda n: (-(ideal[n] - math.floor(ideal[n])), n))[:left]:
        ranks[name] += 1
    return ranks

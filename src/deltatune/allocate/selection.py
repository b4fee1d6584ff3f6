"""Mask selection: which entries of which weights get trained, from magnitudes or data-driven scores.

Pure functions over tensors (plus one that runs a model to measure sensitivity). Positions are flat, row-major
indices into the (out, fan_in) matrix view of `core.layers`, returned sorted (the order `functional.sparse`
expects). Ties are broken by position (lower flat index first), so every selection is deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.train.batches import split_batch
from deltatune.train.losses import LossFn as TaskLossFn
from deltatune.train.losses import batch_loss


def check_budget(budget: float, field: str = "budget") -> None:
    """Raise a ConfigError unless `budget` is a share in (0, 1) or a whole count >= 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
        raise ConfigError(f"{field}={budget!r} is invalid: expected a share in (0, 1) or an integer count >= 1")
    if budget >= 1 and not float(budget).is_integer():
        raise ConfigError(f"{field}={budget!r} is invalid: a count must be a whole number; use a share in (0, 1)")


def resolve_budget(budget: float, total: int, field: str = "budget") -> int:
    """A budget given as a share in (0, 1) or as a count (an integer >= 1) -> a count in [1, total]."""
    check_budget(budget, field)
    count = round(budget * total) if budget < 1 else int(budget)
    if count < 1:
        raise ConfigError(
            f"{field}={budget!r} selects nothing out of {total:,} entries: expected at least one; raise {field}"
        )
    if count > total:
        raise ConfigError(f"{field}={budget!r} asks for {count:,} entries but only {total:,} exist; lower {field}")
    return count


def _sorted_take(order: Tensor, count: int) -> Tensor:
    return order[:count].sort().values


def smallest_magnitude_positions(matrix: Tensor, count: int) -> Tensor:
    """The `count` entries with the smallest |w| (SaRA's "temporarily ineffective" weights)."""
    order = torch.argsort(matrix.detach().abs().reshape(-1), stable=True)
    return _sorted_take(order, count)


def below_threshold_positions(matrix: Tensor, threshold: float) -> Tensor:
    """Every entry with |w| < threshold (SaRA's absolute threshold θ, paper Eq. 2)."""
    return torch.nonzero(matrix.detach().abs().reshape(-1) < threshold).reshape(-1)


def largest_score_positions(scores: Tensor, count: int) -> Tensor:
    """The `count` entries with the largest score."""
    order = torch.argsort(scores.detach().reshape(-1), descending=True, stable=True)
    return _sorted_take(order, count)


def global_magnitude_threshold(weights: Iterable[Tensor], fraction: float) -> float:
    """θ such that a share `fraction` of all entries of `weights` (taken together) have |w| < θ."""
    magnitudes = torch.cat([w.detach().abs().reshape(-1).float().cpu() for w in weights])
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction={fraction!r} is invalid: expected a share in (0, 1)")
    count = round(fraction * magnitudes.numel())
    if count < 1:
        raise ConfigError(f"fraction={fraction!r} selects nothing out of {magnitudes.numel():,} entries; raise it")
    kth = torch.kthvalue(magnitudes, count).values
    above = magnitudes[magnitudes > kth]
    # θ halfway to the next magnitude keeps "|w| < θ" exact for the selected entries
    return float((kth + above.min()) / 2) if above.numel() else math.nextafter(float(kth), math.inf)


def global_top_counts(scores: Mapping[str, Tensor], budget: int) -> dict[str, int]:
    """How many of the `budget` largest scores (over every tensor together) fall in each tensor.

    Exactly `budget` entries are counted; entries tied with the last one admitted go to tensors in the
    mapping's order, then by position (the rule `largest_score_positions` applies inside each tensor).
    """
    total = sum(s.numel() for s in scores.values())
    if not 1 <= budget <= total:
        raise ConfigError(f"budget={budget} is invalid: expected 1 <= budget <= {total:,} scored entries")
    candidates = torch.cat([s.detach().reshape(-1).float().topk(min(budget, s.numel())).values.cpu()
                            for s in scores.values()])
    kth = candidates.topk(budget).values[-1]
    counts = {name: int((s.detach().float() > kth).sum()) for name, s in scores.items()}
    remaining = budget - sum(counts.values())
    for name, s in scores.items():
        ties = int((s.detach().float() == kth).sum())
        take = min(ties, remaining)
        counts[name] += take
        remaining -= take
    return counts


def d3_scores(grad: Tensor, value: Tensor, eps: float = 1e-3, exponent: float = 0.0) -> Tensor:
    """ID³'s D3 importance |g| / (|θ| + ε)^e: e = 0 is gradient magnitude, larger e favours small weights."""
    return grad.abs() / (value.abs() + eps).pow(exponent)


Objective = Callable[[nn.Module, object], Tensor]
"""`objective(model, batch) -> 0-dim loss tensor`: runs the model on one raw batch."""


def task_objective(loss_fn: TaskLossFn | None = None) -> Objective:
    """The trainer's task loss as an objective: a batch in either convention of `deltatune.train.batches` (dict
    with "labels", or a tuple (inputs..., labels)) on the model's device, scored by `loss_fn(outputs, labels)`,
    else the model's own `.loss`, else classification cross-entropy (`deltatune.train.losses.batch_loss`)."""

    def objective(model: nn.Module, batch: Any) -> Tensor:
        device = next(model.parameters()).device
        return batch_loss(model, split_batch(batch).to(device), loss_fn)[0]

    return objective


def taylor_sensitivity(
    model: nn.Module, weights: Mapping[str, Tensor], batches: Iterable[object], objective: Objective,
) -> dict[str, Tensor]:
    """First-order Taylor sensitivity Σ_batches (∂L/∂w)² of each entry of `weights` (SPT's stage 1).

    A gradient step ε on w changes the loss by about −ε g², so g² ranks entries by how much tuning them alone
    can lower the loss. `weights` maps a name to a parameter of `model` (frozen ones too); the model's weights,
    `requires_grad` flags and `.grad` fields are left as they were. Returns float32 scores of each weight's shape.
    """
    params = dict(weights)
    was_trainable = {name: p.requires_grad for name, p in params.items()}
    old_grads = {name: p.grad for name, p in params.items()}
    scores = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    seen = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            grads = torch.autograd.grad(objective(model, batch), list(params.values()), allow_unused=True)
            for (name, _), grad in zip(params.items(), grads):
                if grad is not None:
                    scores[name] += grad.detach().float().square()
            seen += 1
    finally:
        for name, p in params.items():
            p.requires_grad_(was_trainable[name])
            p.grad = old_grads[name]
    if seen == 0:
        raise ConfigError("batches is empty: sensitivity needs at least one batch; pass a few training batches")
    return scores

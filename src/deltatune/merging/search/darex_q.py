"""Choosing DAREx-q's rescaling divisor q (Deng et al., ICLR 2025, §4; official code vengdeng/DAREx).

Three ways, as in the paper and its code:

1. **Global q, labelled data**: `search_rescale_q(objective)` with `objective(q)` = a validation metric of the
   model pruned with divisor q. Coarse grid from 1 − p upwards with early stopping, then a finer grid around
   the best (`find_q_encoder.py::find_optimal_param`).
2. **Global q, unlabelled data**: the same search with `objective(q) = −output_change(...)`: the mean absolute
   change of the last layer's outputs on a few unlabelled inputs (Fig. 1 left: it tracks the test-optimal q).
   `seed_averaged` repeats the random drop over seeds 0–3 and removes the one outlying run, as the code does.
3. **Per-layer q, analytical**: `analytical_layer_q` minimises, for every output row i of a linear layer,
   |η(1 − (1−p)/q) Σ_j c_ij + η² φ(p) Σ_j c_ij² / (4q²) + log(2/(1−γ))| with c_ij = Δw_ij · x̄_j (x̄ = mean
   input activation, bias appended as a column) and φ(p) = (1 − 2p)/log((1 − p)/p), over
   q ∈ [1 − p, 0.999] in steps of 0.001; the layer's q is the mean over rows. The scalar η is itself chosen by
   method 1 or 2 (`search_rescale_q` over η). This follows `utils/analyticalq.py`.

Every function takes callables, so it works for any model and metric; nothing here reads files.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from deltatune.errors import config_check
from deltatune.merging.search.result import SearchResult


def _grid(start: float, stop: float, step: float) -> list[float]:
    """start, start + step, ... up to stop (inclusive, with float slack)."""
    return [min(float(v), stop) for v in np.arange(start, stop + step / 2, step) if v <= stop + 1e-9]


def _scan(objective: Callable[[float], float], grid: Iterable[float], patience: int,
          history: list[tuple[float, float]]) -> None:
    best, misses = -math.inf, 0
    for value in grid:
        score = float(objective(float(value)))
        history.append((float(value), score))
        if score >= best:
            best, misses = score, 0
        else:
            misses += 1
            if misses > patience:  # the code stops after more than `patience` non-improvements
                break


def search_rescale_q(objective: Callable[[float], float], lower: float, upper: float = 1.0, step: float = 0.1,
                     refine: float = 0.1, patience: int = 3) -> SearchResult:
    """Maximise `objective` over a coarse grid lower, lower+step, …, upper, then a grid of step·refine around
    the best (between best − step·(1 − refine) and best + step), as `find_optimal_param` does (except that no
    value above `upper` is tried: the official grid can overshoot it by one step).

    lower: 1 − p for a global q (the DARE factor). Works for η of the analytical per-layer q as well.
    """
    config_check(step > 0, "step", step, "a positive grid step")
    config_check(0 < refine <= 1, "refine", refine, "a fraction in (0, 1]")
    config_check(upper >= lower, "upper", upper, f">= lower ({lower})")
    history: list[tuple[float, float]] = []
    _scan(objective, _grid(lower, upper, step), patience, history)
    best = max(history, key=lambda item: item[1])[0]
    fine_lower = max(lower + step * refine, best - step * (1 - refine))
    _scan(objective, _grid(fine_lower, min(best + step, upper), step * refine), patience, history)
    best, score = max(history, key=lambda item: item[1])
    return SearchResult(best, score, history)


def output_change(reference: Tensor, output: Tensor) -> float:
    """Mean |reference − output| over every entry (the unsupervised proxy of Fig. 1; maximise its negative)."""
    return float((reference.float() - output.float()).abs().mean())


def seed_averaged(objective_for_seed: Callable[[float, int], float], seeds: Sequence[int] = (0, 1, 2, 3),
                  drop_outlier: bool = True) -> Callable[[float], float]:
    """q ↦ mean over seeds of objective_for_seed(q, seed), without the run farthest from the mean when there
    are at least 3 seeds (the official code's `remove_one_outlier`)."""

    def objective(q: float) -> float:
        scores = [float(objective_for_seed(q, seed)) for seed in seeds]
        if drop_outlier and len(scores) >= 3:
            mean = sum(scores) / len(scores)
            scores.remove(max(scores, key=lambda s: abs(s - mean)))
        return sum(scores) / len(scores)

    return objective


def phi(drop_rate: float) -> float:
    """φ(p) = (1 − 2p) / log((1 − p)/p); its limit 1/2 at p = 1/2."""
    if abs(drop_rate - 0.5) < 1e-12:
        return 0.5
    return (1 - 2 * drop_rate) / math.log((1 - drop_rate) / drop_rate)


def analytical_row_q(contributions: Tensor, drop_rate: float, eta: float, gamma: float = 0.95,
                     stop_fraction: float = 0.8, step: float = 0.001) -> Tensor:
    """Per-row q minimising the DAREx bound for contributions c [rows, inputs] (see the module docstring).

    The scan over q stops once `stop_fraction` of the rows have stopped improving (outlier guard of the code).
    """
    config_check(0 < drop_rate < 1, "drop_rate", drop_rate, "0 < p < 1")
    c = contributions.double()
    linear, quadratic = c.sum(dim=1), c.square().sum(dim=1)
    rows = c.shape[0]
    best_q = torch.full((rows,), 1 - drop_rate, dtype=torch.float64, device=c.device)
    best = torch.full((rows,), math.inf, dtype=torch.float64, device=c.device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=c.device)
    constant, curvature = math.log(2 / (1 - gamma)), eta ** 2 * phi(drop_rate) / 4
    for index in range(int(round((1 - drop_rate) / step)), int(round(1 / step)) - 1):
        q = index * step
        value = (eta * (1 - (1 - drop_rate) / q) * linear + curvature * quadratic / q ** 2 + constant).abs()
        improved, not_better = value <= best, value >= best
        best = torch.where(improved, value, best)
        best_q = torch.where(improved, torch.full_like(best_q, q), best_q)
        stopped |= not_better
        if stopped.float().mean() >= stop_fraction:
            break
    return best_q


def analytical_layer_q(delta_weight: Tensor, mean_input: Tensor, drop_rate: float, eta: float,
                       delta_bias: Tensor | None = None, **scan_options) -> float:
    """One linear layer's q: the mean of `analytical_row_q` over rows, c_ij = Δw_ij · x̄_j (+ Δb_i column)."""
    contributions = delta_weight.double() * mean_input.double().reshape(1, -1)
    if delta_bias is not None:
        contributions = torch.cat([contributions, delta_bias.double().reshape(-1, 1)], dim=1)
    return float(analytical_row_q(contributions, drop_rate, eta, **scan_options).mean())


def analytical_q_map(deltas: Mapping[str, Tensor], mean_inputs: Mapping[str, Tensor], drop_rate: float,
                     eta: float, **scan_options) -> dict[str, float]:
    """q for every tensor: linear weights with a mean input get their own q, a bias its weight's q, every other
    tensor the mean q (`rescale_q` in the official code). Keys of `mean_inputs` are weight names."""
    q = {}
    for name, x_mean in mean_inputs.items():
        bias = deltas.get(name[: -len("weight")] + "bias") if name.endswith("weight") else None
        q[name] = analytical_layer_q(deltas[name], x_mean, drop_rate, eta, bias, **scan_options)
    config_check(bool(q), "mean_inputs", "{}", "mean input activations for at least one weight in `deltas`")
    fallback = sum(q.values()) / len(q)
    result = {}
    for name in deltas:
        weight_name = name[: -len("bias")] + "weight" if name.endswith("bias") else name
        result[name] = q.get(name, q.get(weight_name, fallback))
    return result


@torch.no_grad()
def collect_input_statistics(model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object]
                             | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Mean input x̄_j and input L2 norm ‖x_j‖₂ of every nn.Linear, over all tokens of `batches`.

    Returns ({weight name: x̄}, {weight name: ‖x‖₂}); x̄ feeds `analytical_q_map`, ‖x‖₂ the WANDA-style
    importance score of `deltatune.merging.algebra.importance`. `forward(model, batch)` defaults to `model(**batch)` for
    dicts, `model(batch)` otherwise.
    """
    sums, squares, counts, handles = {}, {}, {}, []

    def hook(name: str):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.sum(dim=0)
            squares[name] = squares.get(name, 0) + x.square().sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(f"{name}.weight" if name else "weight")))
    try:
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            else:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    means = {name: (sums[name] / counts[name]).float() for name in sums}
    norms = {name: squares[name].sqrt().float() for name in squares}
    return means, norms

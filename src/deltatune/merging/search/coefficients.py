"""Searching merge coefficients with an evolutionary strategy (PCB-Merging §3.4; Du et al., NeurIPS 2024).

PCB searches the per-model coefficients λ_i with a gradient-free optimiser under a small evaluation budget,
scoring each candidate merged model on **validation** data (official vision code: nevergrad NGOpt, λ_i
initialised at 1.0 within [0.8, 1.3], 100 evaluations). Here CMA-ES (`cma` package) plays that role — the
paper's family of method, a different library, documented as a deviation. Never score on test data: the
official NLP script does, which leaks.

`search_coefficients(objective, n)` maximises any `objective(list_of_coefficients) -> float`; with
`deltatune.merging.methods.pcb.pcb_components` precomputed, each evaluation is one weighted sum per tensor
(`apply_coefficients`) plus the caller's evaluation.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from deltatune.errors import config_check
from deltatune.merging.search.result import SearchResult


def search_coefficients(objective: Callable[[list[float]], float], count: int, *, initial: float = 1.0,
                        bounds: tuple[float, float] = (0.8, 1.3), budget: int = 100, sigma: float | None = None,
                        seed: int = 0) -> SearchResult:
    """Maximise `objective` over `count` coefficients in `bounds` with CMA-ES (at most `budget` evaluations).

    Returns the best coefficients (`best` holds them as a list), their score and every evaluation in order.
    """
    import cma

    config_check(count >= 1, "count", count, "at least one coefficient")
    config_check(bounds[0] < bounds[1], "bounds", bounds, "(low, high) with low < high")
    config_check(bounds[0] <= initial <= bounds[1], "initial", initial, f"a value inside bounds {bounds}")
    config_check(budget >= 1, "budget", budget, "at least one evaluation")
    history: list[tuple[list[float], float]] = []

    def evaluate(values: list[float]) -> float:
        score = float(objective(values))
        history.append((values, score))
        return score

    if count == 1:  # CMA-ES needs two dimensions; a one-coefficient search is a grid
        for value in torch.linspace(bounds[0], bounds[1], budget).tolist():
            evaluate([value])
    else:
        options = {"bounds": [bounds[0], bounds[1]], "maxfevals": budget, "seed": seed + 1, "verbose": -9}
        strategy = cma.CMAEvolutionStrategy([initial] * count, sigma or (bounds[1] - bounds[0]) / 4, options)
        while not strategy.stop() and len(history) < budget:
            candidates = strategy.ask()
            if len(history) + len(candidates) > budget:  # the last, partial generation is only evaluated
                for candidate in candidates[: budget - len(history)]:
                    evaluate([float(x) for x in candidate])
                break
            strategy.tell(candidates, [-evaluate([float(x) for x in c]) for c in candidates])
    best, score = max(history, key=lambda item: item[1])
    return SearchResult(best, score, history)


def apply_coefficients(base: Mapping[str, Tensor], components: Mapping[str, Tensor],
                       coefficients: Sequence[float]) -> dict[str, Tensor]:
    """θ_0 + Σ_i λ_i U_i per tensor, for components stacked [models, ...] (see `pcb_components`)."""
    merged = {}
    for name, value in base.items():
        if name not in components:
            merged[name] = value.clone()
            continue
        stack = components[name]
        lambdas = torch.tensor(list(coefficients), dtype=stack.dtype, device=stack.device)
        merged[name] = (value + torch.tensordot(lambdas, stack, dims=1)).to(value.dtype)
    return merged


def pcb_component_state_dict(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]],
                             params=None) -> dict[str, Tensor]:
    """Per floating tensor, PCB's U_i stacked over models (per-tensor scope), for `apply_coefficients`."""
    from deltatune.merging.methods.pcb import PCBParams, pcb_components

    params = params or PCBParams()
    return {name: pcb_components(torch.stack([m[name] - value for m in models]), params)
            for name, value in base.items() if value.is_floating_point()}

"""Loss-landscape diagnostics of two trained models: the linear-mode-connectivity (LMC) barrier and linear CKA.

These are the two measurements of the three-regime model of pruning (Zhou, Yang, Chang, Mahoney, ICML 2023,
arXiv 2305.18383; official code `YefanZhou/ThreeRegimePruning`, `loss_landscape_measure/{lmc.py, cka_simi.py}`
and `visualization/load_temperature_plots.ipynb`): the barrier tells poorly connected solutions (regime I) from
well-connected ones (II), CKA splits the well-connected ones into dissimilar (II-A) and similar outputs (II-B).

- `lmc_barrier(model_a, model_b, evaluate, points=11)`: the error e(α) of θ(α) = (1 − α)·θ_a + α·θ_b at
  `points` evenly spaced α in [0, 1] (the code's 11), and the barrier

      barrier = ½(e(0) + e(1)) − e(α*),   α* = argmax_α |½(e(0) + e(1)) − e(α)|

  as the code's notebook computes it (on the training error): **negative** when the path climbs over a hump
  (poorly connected), positive when it dips below the endpoints' mean. The first α attaining the maximum wins.
  As in the code, the endpoints are candidates too: on a path with no interior extremum and e(0) ≠ e(1) the
  barrier is ±½|e(1) − e(0)| (its sign depends on which model is `a`); for retrained pairs, whose endpoint
  errors are close, this is small, but it is why `label_regimes` counts only humps above a threshold.
- `linear_cka(features_a, features_b)`: CKA with a linear kernel, the **biased** estimator (the code calls
  `cka_compute(gram_linear(x), gram_linear(y))` with `debiased=False`), equal to the feature-space form
  ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F) on column-centred X, Y (Kornblith et al. 2019, Eq. 5 with the centring of
  their §3). The code's study reads it on the models' **softmax outputs** over the first training batches in
  eval mode (the last of its `input`, `output`, `softmax` keys).

BatchNorm: an interpolated network's running statistics are not the interpolation of the endpoints' (the code
therefore recomputes them at every α, endpoints included, with `mc_utils.update_bn`: statistics reset, then a
cumulative average over the training loader, batch b weighted by its size). `lmc_barrier` does the same from
`norm_inputs` (`recompute_batch_norm`), and refuses a model with running statistics when none are given.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError

DEFAULT_POINTS = 11  # the code's --num-points
ModelInput = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


@dataclass(frozen=True)
class ConnectivityCurve:
    """The errors along the straight line between two weight sets and its barrier (see the module docstring)."""

    alphas: tuple[float, ...]
    errors: tuple[float, ...]
    barrier: float
    alpha_star: float


def barrier_height(errors: Sequence[float]) -> tuple[float, int]:
    """(½(e_0 + e_last) − e_i*, i*) with i* the first index maximising |½(e_0 + e_last) − e_i| (the notebook's)."""
    if len(errors) < 3:
        raise ConfigError(f"a barrier needs at least 3 points on the path (the endpoints and one between); got "
                          f"{len(errors)}: evaluate more points")
    endpoint_mean = 0.5 * (errors[0] + errors[-1])
    deviations = [abs(endpoint_mean - error) for error in errors]
    index = deviations.index(max(deviations))
    return endpoint_mean - errors[index], index


def interpolated_state(state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], alpha: float
                       ) -> dict[str, Tensor]:
    """(1 − α)·a + α·b for every floating-point entry; other entries (BatchNorm's counters) from `a`."""
    if state_a.keys() != state_b.keys():
        missing = sorted(set(state_a) ^ set(state_b))[:5]
        raise ConfigError(f"the two models have different state keys (e.g. {missing}); interpolate two models of "
                          "the same architecture")
    mixed = {}
    for key, tensor_a in state_a.items():
        tensor_b = state_b[key]
        if tensor_a.shape != tensor_b.shape:
            raise ConfigError(f"{key} has shape {tuple(tensor_a.shape)} in one model and {tuple(tensor_b.shape)} "
                              "in the other; interpolate two models of the same architecture")
        mixed[key] = torch.lerp(tensor_a, tensor_b, alpha) if tensor_a.is_floating_point() else tensor_a.clone()
    return mixed


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's batch norms that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _call(model: nn.Module, inputs: ModelInput) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, norm_inputs: Iterable[ModelInput]) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them as the size-weighted average over
    `norm_inputs` (the code's `update_bn`: momentum n_b / (n_seen + n_b) for batch b); the model's mode and
    momenta are restored. Each input is passed as `model(x)`, `model(*x)` (a tuple) or `model(**x)` (a dict)."""
    norms = batch_norms(model)
    if not norms:
        return
    was_training, momenta = model.training, [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
    model.train()
    seen = 0
    try:
        for inputs in norm_inputs:
            size = _batch_size(inputs)
            for norm in norms:
                norm.momentum = size / (seen + size)
            _call(model, inputs)
            seen += size
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ConfigError("norm_inputs gave no batch: pass the training inputs to re-estimate BatchNorm statistics")


def _batch_size(inputs: ModelInput) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else (
        inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
    return int(first.shape[0])


def lmc_barrier(model_a: nn.Module, model_b: nn.Module, evaluate: Callable[[nn.Module], float],
                points: int = DEFAULT_POINTS, *, norm_inputs: Iterable[ModelInput] | None = None
                ) -> ConnectivityCurve:
    """The error curve on the straight line between `model_a` and `model_b` and its barrier (module docstring).

    `evaluate(model) -> error` is called on a copy holding θ(α) (the study uses the training error in [0, 1]);
    the two models are not modified. A model with BatchNorm running statistics needs `norm_inputs` (re-iterable:
    a list of training batches), from which the statistics are re-estimated at every α, as the code does.
    """
    if not isinstance(points, int) or points < 3:
        raise ConfigError(f"points={points!r} is invalid: expected an integer >= 3 (the code uses 11)")
    if batch_norms(model_a) and norm_inputs is None:
        raise ConfigError("the models have BatchNorm running statistics, which are not linear in the weights; pass "
                          "norm_inputs (training batches) so that they are re-estimated at every point, as the "
                          "three-regime code does")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    probe = copy.deepcopy(model_a)
    alphas = tuple(float(a) for a in torch.linspace(0.0, 1.0, points, dtype=torch.float64))
    errors = []
    for alpha in alphas:
        probe.load_state_dict(interpolated_state(state_a, state_b, alpha))
        if norm_inputs is not None:
            recompute_batch_norm(probe, norm_inputs)
        errors.append(float(evaluate(probe)))
    barrier, index = barrier_height(errors)
    return ConnectivityCurve(alphas, tuple(errors), barrier, alphas[index])


def linear_cka(features_a: Tensor, features_b: Tensor) -> float:
    """Linear CKA of two feature matrices over the same n examples (rows; other dimensions are flattened),
    the biased estimator in float64: ‖Bᵀ A‖²_F / (‖Aᵀ A‖_F ‖Bᵀ B‖_F) after centring each column. 1 for identical
    inputs; invariant to orthogonal transforms and isotropic scaling of either argument."""
    if features_a.shape[0] != features_b.shape[0]:
        raise ConfigError(f"CKA compares the same examples: got {features_a.shape[0]} and {features_b.shape[0]} "
                          "rows; pass both models' features on the same inputs")
    if features_a.shape[0] < 2:
        raise ConfigError("CKA needs at least 2 examples (rows)")
    a = _centred(features_a, "features_a")
    b = _centred(features_b, "features_b")
    cross = torch.linalg.matrix_norm(b.T @ a) ** 2
    return float(cross / (torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)))


def _centred(features: Tensor, name: str) -> Tensor:
    flat = features.detach().reshape(features.shape[0], -1).double()
    centred = flat - flat.mean(dim=0, keepdim=True)
    if not torch.any(centred != 0):
        raise ConfigError(f"{name} is the same for every example (zero after centring): CKA is undefined; "
                          "compare features that vary over the inputs")
    return centred

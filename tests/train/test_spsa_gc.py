"""SPSA-GC (deltatune.optim.spsa_gc): the estimate, the correction, the gain schedules, resuming."""
from __future__ import annotations

import math

import pytest
import torch

from deltatune.errors import ConfigError, TrainingError
from deltatune.optim.spsa_gc import SPSAGC, perturbation_size, segmented_uniform, spsa_gradient, step_size


def _quadratic(dim: int, seed: int = 0):
    """L(w) = ½ wᵀ A w + bᵀ w with A symmetric positive definite, and its true gradient."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T / dim + torch.eye(dim, dtype=torch.float64)
    shift = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (lambda w: float(0.5 * w @ matrix @ w + shift @ w)), (lambda w: matrix @ w + shift)


def test_gain_schedules_are_the_papers():
    assert step_size(1) == pytest.approx(0.01 / 2**0.4)  # a / (k + o)^α with a 0.01, o 1, α 0.4
    assert step_size(9, a=0.02, offset=1.0, alpha=0.6) == pytest.approx(0.02 / 10**0.6)
    assert perturbation_size(1) == pytest.approx(0.01)  # c / k^γ with c 0.01, γ 0.1
    assert perturbation_size(32, c=0.005, gamma=0.2) == pytest.approx(0.005 / 2.0)
    optimizer = SPSAGC([torch.nn.Parameter(torch.zeros(2))])
    group = optimizer.param_groups[0]
    defaults = {k: group[k] for k in ("a", "c", "offset", "alpha", "gamma", "momentum", "perturbations")}
    assert defaults == {"a": 0.01, "c": 0.01, "offset": 1.0, "alpha": 0.4, "gamma": 0.1, "momentum": 0.9,
                        "perturbations": 5}
    assert optimizer.gains(7) == (pytest.approx(0.01 / 8**0.4), pytest.approx(0.01 / 7**0.1))


def test_perturbations_are_segmented_uniform():
    delta = segmented_uniform(20_000, torch.Generator().manual_seed(0))
    assert bool((delta.abs() >= 0.5).all()) and bool((delta.abs() <= 1.0).all())
    assert abs(float((delta > 0).double().mean()) - 0.5) < 0.02


def test_estimate_is_exact_in_one_dimension():
    # (L(w + cΔ) − L(w − cΔ)) / (2c) / Δ = L'(w) exactly for a quadratic: a flipped sign or a missing 2 fails
    loss, gradient = _quadratic(1)
    w = torch.tensor([0.7], dtype=torch.float64)
    for c in (0.5, 0.01):
        estimate, losses = spsa_gradient(lambda v: loss(v), w, c, 3, torch.Generator().manual_seed(1))
        torch.testing.assert_close(estimate, gradient(w), rtol=1e-9, atol=1e-12)
        assert len(losses) == 6


def test_estimate_is_unbiased_in_many_dimensions():
    loss, gradient = _quadratic(8)
    w = torch.linspace(-1, 1, 8, dtype=torch.float64)
    estimate, _ = spsa_gradient(lambda v: loss(v), w, 0.01, 4000, torch.Generator().manual_seed(2))
    true = gradient(w)
    assert float((estimate - true).norm() / true.norm()) < 0.1
    assert float(estimate @ true) > 0.99 * float(estimate.norm() * true.norm())  # same direction, right sign


def _linear_run(correction: bool, steps: int, slope: float = 2.0) -> list[float]:
    """w after each step on L(w) = slope · w, where the one-dimensional estimate is exactly the slope."""
    weight = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = SPSAGC([weight], a=0.1, momentum=0.9, perturbations=2, correction=correction)
    trace = []
    for _ in range(steps):
        optimizer.step(lambda: slope * weight.sum())
        trace.append(float(weight.detach()))
    return trace


def test_correction_is_the_nesterov_look_ahead():
    beta, slope = 0.9, 2.0
    a1, a2, a3 = (step_size(k, a=0.1) for k in (1, 2, 3))
    # m1 = g, direction g + βm1; m2 = βm1 + g, direction g + βm2; ...
    m1 = slope
    m2 = beta * m1 + slope
    m3 = beta * m2 + slope
    expected = [1.0 - a1 * (slope + beta * m1)]
    expected.append(expected[-1] - a2 * (slope + beta * m2))
    expected.append(expected[-1] - a3 * (slope + beta * m3))
    assert _linear_run(True, 3) == pytest.approx(expected, rel=1e-12)
    plain = [1.0 - a1 * slope, 1.0 - (a1 + a2) * slope, 1.0 - (a1 + a2 + a3) * slope]
    assert _linear_run(False, 3) == pytest.approx(plain, rel=1e-12)


def test_one_step_reads_the_loss_two_s_times_and_returns_their_mean():
    weight = torch.nn.Parameter(torch.zeros(4))
    calls = []

    def closure():
        calls.append(weight.detach().clone())
        return float(weight.sum())

    optimizer = SPSAGC([weight], perturbations=5)
    value = optimizer.step(closure)
    assert len(calls) == 10
    assert float(value) == pytest.approx(sum(float(v.sum()) for v in calls) / 10)
    # the queries come in ± pairs around the same point
    for plus, minus in zip(calls[0::2], calls[1::2]):
        torch.testing.assert_close((plus + minus) / 2, torch.zeros(4))


def test_descends_a_quadratic():
    loss, _ = _quadratic(10, seed=3)
    weight = torch.nn.Parameter(torch.full((10,), 2.0, dtype=torch.float64))
    optimizer = SPSAGC([weight], a=0.05, seed=0)
    start = loss(weight.detach())
    for _ in range(200):
        optimizer.step(lambda: loss(weight.detach()))
    assert loss(weight.detach()) < 0.2 * start


def test_resume_continues_exactly():
    loss, _ = _quadratic(5, seed=4)

    def run(steps: int, optimizer: SPSAGC, weight: torch.nn.Parameter) -> None:
        for _ in range(steps):
            optimizer.step(lambda: loss(weight.detach()))

    straight = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    run(5, SPSAGC([straight], seed=7), straight)
    first = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    optimizer = SPSAGC([first], seed=7)
    run(3, optimizer, first)
    resumed = torch.nn.Parameter(first.detach().clone())
    again = SPSAGC([resumed], seed=123)  # another seed: the saved generator state must win
    again.load_state_dict(optimizer.state_dict())
    run(2, again, resumed)
    torch.testing.assert_close(resumed.detach(), straight.detach(), rtol=0, atol=0)


def test_bad_settings_and_missing_closure_are_refused():
    weight = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ConfigError, match="perturbations"):
        SPSAGC([weight], perturbations=0)
    with pytest.raises(ConfigError, match="momentum"):
        SPSAGC([weight], momentum=1.0)
    with pytest.raises(TrainingError, match="closure"):
        SPSAGC([weight]).step()
    with pytest.raises(TrainingError, match="not finite"):
        SPSAGC([weight]).step(lambda: math.nan)
    assert float(weight.detach().abs().sum()) == 0.0  # a refused step leaves the parameters where they were

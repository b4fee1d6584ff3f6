"""SAM: ε̂ = ρ·g/‖g‖₂ and the step from w with the gradient at w + ε̂; refused settings."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, TrainingError
from deltatune.optim import SAM

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    return torch.sin(x @ weight + bias).pow(2).sum() + weight.pow(4).sum()


def _gradient(weight: Tensor, bias: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    w, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    _loss(w, b, x).backward()
    return w.grad, b.grad


def test_perturbation_and_step_are_the_papers_equations() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    weight = nn.Parameter(torch.randn(4, 3, generator=generator, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(3, generator=generator, dtype=torch.float64))
    start = (weight.detach().clone(), bias.detach().clone())
    rho, lr = 0.3, 0.1
    g_w, g_b = _gradient(*start, x)
    norm = torch.sqrt(g_w.pow(2).sum() + g_b.pow(2).sum())
    eps_w, eps_b = rho * g_w / norm, rho * g_b / norm  # Eq. 2 with p = 2: one norm over every tensor
    at_w, at_b = _gradient(start[0] + eps_w, start[1] + eps_b, x)  # the gradient at w + ε̂
    expected = (start[0] - lr * at_w, start[1] - lr * at_b)

    optimizer = SAM(torch.optim.SGD([weight, bias], lr=lr), rho=rho)
    calls = []

    def closure() -> Tensor:
        calls.append((weight.detach().clone(), bias.detach().clone()))
        loss = _loss(weight, bias, x)
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)
    torch.testing.assert_close(calls[1][0], start[0] + eps_w)  # the second pass ran at w + ε̂
    torch.testing.assert_close(calls[1][1], start[1] + eps_b)
    torch.testing.assert_close(weight.detach(), expected[0])
    torch.testing.assert_close(bias.detach(), expected[1])


def test_perturb_restore_round_trip_and_base_state() -> None:
    weight = nn.Parameter(torch.ones(3))
    optimizer = SAM(torch.optim.AdamW([weight], lr=0.1), rho=0.5)
    weight.sum().backward()
    norm = optimizer.perturb()
    assert norm == pytest.approx(3 ** 0.5)
    torch.testing.assert_close(weight.detach(), torch.ones(3) + 0.5 / 3 ** 0.5)
    optimizer.restore()
    torch.testing.assert_close(weight.detach(), torch.ones(3))
    optimizer.step()  # the caller ran both passes: the base step only
    assert "exp_avg" in optimizer.state_dict()["state"][0]


def test_refuses_bad_radius_and_a_step_without_the_second_pass() -> None:
    weight = nn.Parameter(torch.ones(3))
    for rho in (0, -0.1):
        with pytest.raises(ConfigError, match="rho"):
            SAM(torch.optim.SGD([weight], lr=0.1), rho=rho)
    optimizer = SAM(torch.optim.SGD([weight], lr=0.1))
    weight.sum().backward()
    with pytest.raises(TrainingError, match="closure"):
        optimizer.step()


def test_batch_norm_statistics_follow_the_first_pass_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5, model=model)

    def closure() -> Tensor:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)
    reference(x)  # one training-mode pass at w: the statistics SAM must keep
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1 and model[1].momentum == reference[1].momentum

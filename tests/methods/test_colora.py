"""CoLoRA-style allocation: the contribution measure by hand (SGD), the proportional re-split, resizing that
keeps the largest components or leaves the output unchanged, and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.methods.colora import CoLoRAConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(config: CoLoRAConfig) -> nn.Module:
    torch.manual_seed(0)
    return dt.adapt(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12)).double(), config)


def test_contribution_with_sgd_is_lr_times_the_summed_squared_gradients():
    # with SGD, θ_{t+1} − θ_t = −lr·g_t, so |Σ_t ⟨g_t, Δθ_t⟩| = lr · Σ_t ‖g_t‖²
    config = CoLoRAConfig(targets=["0", "2"], rank=2, probe=4)
    model = _model(config)
    allocator = config.allocator(model, 10)
    x = torch.randn(16, 8, dtype=torch.float64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    expected = {"0": 0.0, "2": 0.0}
    for step in range(1, 4):
        model(x).square().mean().backward()
        for path in expected:
            delta = model.get_submodule(path).deltas["default"]
            expected[path] += 0.1 * sum(float(p.grad.square().sum()) for p, _ in delta.component_tensors().values())
        optimizer.step()
        allocator.step(model, step)
        optimizer.zero_grad()
    for path, value in expected.items():
        assert abs(allocator.contribution[path]) == pytest.approx(value, rel=1e-10)


def test_allocation_splits_the_budget_in_proportion_to_contribution():
    config = CoLoRAConfig(targets=["0", "2"], rank=3, max_rank=5, probe=1)
    model = _model(config)
    allocator = config.allocator(model, 10)
    allocator.contribution = {"0": 1.0, "2": 3.0}
    assert allocator.allocate(step=1) == {"0": 2, "2": 4}  # 6 units: 1 + 4·¼ = 2, 1 + 4·¾ = 4
    assert allocator.describe() == {"0": 2, "2": 4}


def test_the_split_follows_the_size_of_the_contribution_whatever_its_sign():
    """c_i = |Σ_t ⟨g_t, Δθ_t⟩|: a descending loss makes the sums negative; the split uses their size."""
    config = CoLoRAConfig(targets=["0", "2"], rank=3, max_rank=5, probe=1)
    model = _model(config)
    allocator = config.allocator(model, 10)
    allocator.contribution = {"0": -1.0, "2": -3.0}
    assert allocator.allocate(step=1) == {"0": 2, "2": 4}


def test_contributions_measured_while_the_loss_falls_are_negative_and_still_split_the_budget():
    config = CoLoRAConfig(targets=["0", "2"], rank=3, max_rank=6, probe=5)
    model = _model(config)
    allocator = config.allocator(model, 10)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator, dtype=torch.float64)
    target = torch.randn(32, 12, generator=generator, dtype=torch.float64)
    for step in range(1, 5):
        (model(x) - target).square().mean().backward()
        optimizer.step()
        allocator.step(model, step, optimizer)
        optimizer.zero_grad()
    assert all(value < 0 for value in allocator.contribution.values())  # SGD: ⟨g, −lr·g⟩ < 0
    planned = allocator.planned_ranks()
    share = abs(allocator.contribution["0"]) / sum(abs(v) for v in allocator.contribution.values())
    assert planned["0"] == 1 + round(4 * share) and sum(planned.values()) == 6


def test_resizing_keeps_the_largest_components_and_growing_keeps_the_output():
    config = CoLoRAConfig(targets=["0"], rank=3, max_rank=6)
    model = _model(config)
    delta = model[0].deltas["default"]
    with torch.no_grad():
        delta.lora_B[:, :3] = torch.stack([torch.full((12,), v, dtype=torch.float64) for v in (1.0, 3.0, 2.0)], dim=1)
    delta.resize_rank(2, step=1)
    assert delta.rank_mask.tolist() == [False, True, True, False, False, False]
    x = torch.randn(4, 8, dtype=torch.float64)
    before = model(x).detach()
    delta.resize_rank(5, step=2)
    assert delta.rank == 5
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-14)


@pytest.mark.parametrize("fields,message", [
    (dict(rank=0), "rank=0 is invalid"),
    (dict(rank=4, max_rank=2), "max_rank=2 is invalid"),
    (dict(rank=4, min_rank=5), "min_rank=5 is invalid"),
    (dict(probe=0), "probe=0 is invalid"),
    (dict(probe=1.5), "probe=1.5 is invalid"),
])
def test_bad_hyper_parameters_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        CoLoRAConfig(**fields)

"""TriAdaptLoRA: the triangular block structure, growth that leaves ΔW unchanged (up to the code's α/R),
the normalized-Frobenius score by hand, the growth rules, and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.allocate.growth import FrobeniusGrowthScore
from deltatune.errors import ConfigError
from deltatune.methods.triadaptlora import TriAdaptLoRAConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**fields) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12)).double()
    return dt.adapt(base, TriAdaptLoRAConfig(targets=["0", "2"], **fields))


def _perturb(delta) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in delta.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def test_core_is_block_lower_plus_block_upper_triangular():
    delta = _model(init_rank=2, target_rank=6, rank_step=2)[0].deltas["default"]
    delta.grow_rank(1, step=3)
    delta.grow_rank(2, step=4)  # blocks: {0, 1} -> 0, {2} -> 1, {3, 4} -> 2
    assert delta.slot_block.tolist()[:6] == [0, 0, 1, 2, 2, -1] and delta.block_count == 3
    lower, upper = delta._core_masks()
    block = torch.tensor([0, 0, 1, 2, 2])
    expected_lower = block[None, :] <= block[:, None]
    assert torch.equal(lower[:5, :5], expected_lower) and torch.equal(upper[:5, :5], expected_lower.T)
    assert not lower[5].any() and not upper[:, 5].any()  # free slots take no part


def test_growth_leaves_the_update_unchanged_except_for_the_rank_rescaling():
    delta = _model(init_rank=2, target_rank=6)[0].deltas["default"]
    _perturb(delta)
    before = delta.delta_matrix().detach() * (delta.rank + 1e-5)
    delta.grow_rank(3, step=1)
    after = delta.delta_matrix().detach() * (delta.rank + 1e-5)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-15)
    assert delta.rank == 5


def test_frobenius_score_is_the_growth_of_the_normalized_core_norm():
    model = _model(init_rank=2, target_rank=6)
    deltas = {path: d for path, _, d in dt.iter_deltas(model)}
    scorer = FrobeniusGrowthScore()
    scorer.attach(deltas)
    first = deltas["0"]
    start = torch.linalg.matrix_norm(first.core_matrix()).item() / 1
    with torch.no_grad():
        first.lora_C_lower.mul_(3.0)
    first.grow_rank(2, step=1)  # now two blocks
    now = torch.linalg.matrix_norm(first.core_matrix()).item() / 2
    scores = scorer.scores(deltas, 1)
    assert scores["0"] == pytest.approx(now - start, rel=1e-12)
    assert scores["2"] == pytest.approx(0.0, abs=1e-15)
    assert scorer.scores(deltas, 2)["0"] == pytest.approx(0.0, abs=1e-15)  # measured against the last event


@pytest.mark.parametrize("growth", ["linear", "exponential"])
def test_growth_reaches_the_target_without_overshooting(growth):
    config = TriAdaptLoRAConfig(targets=["0", "2"], init_rank=1, target_rank=5, rank_step=3, growth=growth,
                                interval=2)
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12)).double(), config)
    allocator = config.allocator(model, 30)
    x = torch.randn(16, 8, dtype=torch.float64)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, 31):
        model(x).square().mean().backward()
        optimizer.step()
        allocator.step(model, step)
        optimizer.zero_grad()
        assert allocator.total_rank <= 10
    assert allocator.total_rank == 10 and allocator.finished


@pytest.mark.parametrize("fields,message", [
    (dict(init_rank=4, target_rank=2), "target_rank=2 is invalid.*only grows"),
    (dict(growth="cubic"), "growth='cubic' is invalid"),
    (dict(target_rank=8, max_rank=4), "max_rank=4 is invalid"),
    (dict(init_std=0.0), "init_std=0.0 is invalid"),
    (dict(orthogonal_weight=-0.5), "orthogonal_weight=-0.5 is invalid"),
])
def test_bad_hyper_parameters_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        TriAdaptLoRAConfig(**fields)

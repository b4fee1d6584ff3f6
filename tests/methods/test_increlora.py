"""IncreLoRA: reserves ("advance learning"), activation, growth order by score, the target, and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.methods.increlora import RESERVE_VALUE, IncreLoRAConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**fields) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12)).double()
    return dt.adapt(base, IncreLoRAConfig(targets=["0", "2"], **fields))


def test_reserves_are_trained_but_held_at_their_small_value():
    model = _model(init_rank=1, target_rank=4)
    delta = model[0].deltas["default"]
    assert delta.rank == 1 and delta.reserve_mask.tolist()[:3] == [False, True, True]  # rank_step = 4 // 2
    assert torch.all(delta.lora_E == 0)
    reserve_a, reserve_b = delta.lora_A[delta.reserve_mask], delta.lora_B[:, delta.reserve_mask]
    expected = 16.0 / (1 + 1e-5) * RESERVE_VALUE * (reserve_b @ reserve_a)  # alpha / (live rank + 1e-5)
    torch.testing.assert_close(delta.delta_matrix(), expected, rtol=1e-12, atol=1e-18)
    delta.delta_matrix().sum().backward()
    assert delta.lora_A.grad[delta.reserve_mask].abs().sum() > 0  # advance learning: reserves get gradients
    assert torch.all(delta.lora_E.grad[delta.reserve_mask] == 0)  # their e is held, not trained


def test_without_advance_learning_the_output_is_unchanged_at_init():
    model = _model(init_rank=1, target_rank=2, advance_learning=False)
    x = torch.randn(4, 8, dtype=torch.float64)
    with dt.disabled(model):
        base = model(x)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


def test_growth_activates_reserves_from_their_value_and_makes_new_ones():
    model = _model(init_rank=1, target_rank=2, max_rank=3)
    delta = model[0].deltas["default"]
    assert delta.grow_rank(1, step=7) == 1
    assert delta.rank_mask.tolist()[:3] == [True, True, False]
    assert delta.reserve_mask.tolist()[:3] == [False, False, True]
    assert delta.lora_E[1].item() == RESERVE_VALUE and delta.live_since[1].item() == 7
    assert delta.trained_since[2].item() == 7
    assert delta.grow_rank(1, step=8) == 1 and delta.grow_rank(1, step=9) == 0  # max_rank = 3 reached
    delta.stop_growth()
    assert not delta.reserve_mask.any()


def test_events_grow_the_top_modules_by_score_until_the_target():
    config = IncreLoRAConfig(targets=["0", "2"], init_rank=1, target_rank=2, top_modules=1, initial_warmup=0,
                             interval=1)
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12)).double(), config)
    allocator = config.allocator(model, 10)
    allocator.scorer.scores = lambda deltas, step: {"0": 1.0, "2": 5.0} if step == 1 else {"0": 3.0, "2": 0.0}
    allocator.scorer.observe = lambda deltas, step: None
    allocator.step(model, 1)
    assert allocator.describe() == {"0": 1, "2": 2}
    allocator.step(model, 2)
    assert allocator.describe() == {"0": 2, "2": 2} and allocator.finished
    assert not any(d.reserve_mask.any() for d in allocator.deltas.values())


@pytest.mark.parametrize("fields,message", [
    (dict(init_rank=3, target_rank=2), "target_rank=2 is invalid.*only grows"),
    (dict(rank_step=0), "rank_step=0 is invalid"),
    (dict(target_rank=4, max_rank=3), "max_rank=3 is invalid"),
    (dict(top_modules=0), "top_modules=0 is invalid"),
    (dict(interval=0), "interval=0 is invalid"),
    (dict(restart_warmup=-1), "restart_warmup=-1 is invalid"),
])
def test_bad_hyper_parameters_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        IncreLoRAConfig(**fields)


def test_the_scale_is_alpha_over_the_live_rank_not_the_slots_in_use():
    """ΔW = alpha / (live + 1e-5) · B diag(e) A, with reserves (held at 1e-5) in use but not counted."""
    model = _model(init_rank=1, target_rank=4, rank_step=1, alpha=6.0)
    delta = model[0].deltas["default"]
    delta.grow_rank(1, step=1)
    delta.grow_rank(1, step=2)
    assert delta.rank == 3 and int(delta.reserve_mask.sum()) == 1
    with torch.no_grad():
        delta.lora_E.copy_(torch.linspace(0.5, 2.0, delta.rank_capacity, dtype=torch.float64).reshape(-1, 1))
    mixer = torch.where(delta.rank_mask, delta.lora_E.reshape(-1), torch.zeros(()).double())
    mixer = mixer + RESERVE_VALUE * delta.reserve_mask
    expected = 6.0 / (3 + 1e-5) * (delta.lora_B * mixer) @ delta.lora_A
    torch.testing.assert_close(delta.delta_matrix(), expected, rtol=1e-12, atol=1e-15)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(delta(x), x @ expected.T, rtol=1e-12, atol=1e-15)


def test_the_module_score_is_the_smoothed_sensitivity_times_its_uncertainty():
    """σ_t = Σ|ΔW ⊙ ∂L/∂ΔW|/√n by hand each step (ΔW after the optimizer step, when the allocator reads it);
    Ī ← β₁Ī + (1−β₁)σ, Ū ← β₂Ū + (1−β₂)|σ − Ī|; the score is Ī·Ū."""
    config = IncreLoRAConfig(targets=["0", "2"], init_rank=1, target_rank=2, initial_warmup=50, interval=1,
                             beta1=0.7, beta2=0.6, restart_warmup=0)
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12)).double(), config)
    allocator = config.allocator(model, 100)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    deltas = {path: model.get_submodule(path).deltas["default"] for path in ("0", "2")}
    seen: dict[str, tuple] = {}

    def record(path: str):
        def hook(module, args, out):
            out.retain_grad()
            seen[path] = (args[0], out)
        return hook

    hooks = [delta.register_forward_hook(record(path)) for path, delta in deltas.items()]
    average = {path: 0.0 for path in deltas}
    uncertainty = dict(average)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        x = torch.randn(6, 8, generator=generator, dtype=torch.float64)
        model(x).sin().sum().backward()
        optimizer.step()
        for path, delta in deltas.items():
            inputs, out = seen[path]
            gradient = out.grad.T @ inputs  # ∂L/∂ΔW of out = x ΔWᵀ
            matrix = delta.delta_matrix().detach()
            sigma = float((matrix * gradient).abs().sum()) / matrix.numel() ** 0.5
            average[path] = 0.7 * average[path] + 0.3 * sigma
            uncertainty[path] = 0.6 * uncertainty[path] + 0.4 * abs(sigma - average[path])
        allocator.step(model, step, optimizer)
        optimizer.zero_grad()
    for hook in hooks:
        hook.remove()
    scores = allocator.scorer.scores(allocator.deltas, 4)
    assert all(average[p] * uncertainty[p] > 0 for p in deltas)
    for path in deltas:
        assert scores[path] == pytest.approx(average[path] * uncertainty[path], rel=1e-9)


def test_modules_tied_with_the_last_chosen_score_grow_too():
    """The code's `is_dict[n] >= increase_threshold`: every module at the top_h-th score grows."""
    config = IncreLoRAConfig(targets=["0", "2", "4"], init_rank=1, target_rank=3, top_modules=1, initial_warmup=0,
                             interval=1)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12)).double()
    model = dt.adapt(base, config)
    allocator = config.allocator(model, 10)
    allocator.scorer.scores = lambda deltas, step: {"0": 2.0, "2": 1.0, "4": 2.0}
    allocator.scorer.observe = lambda deltas, step: None
    allocator.step(model, 1)
    assert allocator.describe() == {"0": 2, "2": 1, "4": 2}

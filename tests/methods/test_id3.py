"""ID³: increment-S schedule, global D3 unmasking, frozen masked entries, LoRA form, files, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.methods.id3 import ID3Config, ID3Delta, increment_schedule


@given(st.integers(1, 5000), st.integers(1, 300))
def test_increment_schedule_reaches_the_budget_exactly_at_the_last_step(budget, steps):
    counts = [increment_schedule(budget, steps, t) for t in range(steps + 3)]
    assert sum(counts) == budget
    assert max(counts) - min(counts[:steps]) <= 1 and counts[steps:] == [0, 0, 0]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def _adapt(config, seed=0):
    model = dt.adapt(_model(seed), config)
    (unmasking,) = config.training_callbacks(model, total_steps=5)
    return model, unmasking


def test_each_step_unmasks_the_global_top_d3_entries_and_masks_the_rest_of_the_gradient():
    config = ID3Config(budget=23, exponent=1.0, eps=0.01)
    model, unmasking = _adapt(config)
    deltas = [d for _, _, d in dt.iter_deltas(model)]
    with torch.no_grad():
        deltas[0].delta.normal_(std=0.1)
    model(torch.randn(6, 10, dtype=torch.float64)).square().sum().backward()
    grads = [d.delta.grad.clone() for d in deltas]
    scores = torch.cat([
        (g.abs() / ((model.get_submodule(p).base_layer.weight + d.delta.detach()).abs() + 0.01)).reshape(-1)
        for (p, _, d), g in zip(dt.iter_deltas(model), grads)
    ])
    expected = torch.zeros_like(scores, dtype=torch.bool)
    expected[scores.topk(5).indices] = True  # 23 over 5 steps: 5, 5, 5, 4, 4
    assert unmasking.unmask_step() == 5
    got = torch.cat([d.mask.reshape(-1) for d in deltas])
    assert torch.equal(got, expected)
    for d, g in zip(deltas, grads):
        torch.testing.assert_close(d.delta.grad, g * d.mask)


def test_masked_entries_never_move_even_with_weight_decay_and_the_budget_is_met():
    for parametrization in ("weight", "lora"):
        config = ID3Config(budget=40, parametrization=parametrization, lora_rank=2)
        model, unmasking = _adapt(config)
        start = {k: v.clone() for k, v in dt.adapter_state_dict(model).items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
        x = torch.randn(8, 10, dtype=torch.float64)
        for _ in range(7):
            optimizer.zero_grad()
            model(x).sin().sum().backward()
            unmasking.unmask_step()
            optimizer.step()
        assert unmasking.unmasked() == 40
        for path, _, delta in dt.iter_deltas(model):
            for parameter, mask, _ in delta.masked_tensors(model.get_submodule(path).base_layer.weight):
                name = next(n for n, p in delta.named_parameters() if p is parameter)
                before = start[f"{path}.{name}"]
                assert torch.equal(parameter.detach()[~mask], before[~mask]), (parametrization, name)
        changed = sum(int((p.detach() != start[f"{path}.{n}"]).sum())
                      for path, _, d in dt.iter_deltas(model) for n, p in d.named_parameters())
        assert 0 < changed <= 40


def test_lora_form_equals_its_reference_and_starts_at_the_base_output():
    config = ID3Config(parametrization="lora", lora_rank=3, lora_alpha=6.0, targets=["0"])
    reference = _model()
    model = dt.adapt(copy.deepcopy(reference), config)
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    delta: ID3Delta = next(dt.iter_deltas(model))[2]
    with torch.no_grad():
        delta.lora_A.normal_()
        delta.lora_B.normal_()
    weight = reference[0].weight + 2.0 * delta.lora_B @ (delta.lora_A_init + delta.lora_A)
    hidden = torch.tanh(x @ weight.T + reference[0].bias)
    torch.testing.assert_close(model(x), reference[2](hidden), rtol=1e-12, atol=1e-12)


def test_masks_survive_save_and_load(tmp_path):
    config = ID3Config(budget=0.2)
    model, unmasking = _adapt(config)
    reference = _model()
    x = torch.randn(5, 10, dtype=torch.float64)
    model(x).sum().backward()
    unmasking.unmask_step()
    dt.save_adapter(model, tmp_path / "id3")
    loaded = dt.load_adapter(reference, tmp_path / "id3")
    masks = {p: d.mask for p, _, d in dt.iter_deltas(model)}
    assert sum(int(m.sum()) for m in masks.values()) > 0
    for path, _, delta in dt.iter_deltas(loaded):
        assert torch.equal(delta.mask, masks[path])


@pytest.mark.parametrize("field,value", [("budget", 0), ("budget", 1.5), ("exponent", -1.0), ("eps", 0.0),
                                         ("parametrization", "adapter"), ("lora_rank", 0)])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ID3Config(**{field: value})


def test_budgets_and_schedules_that_cannot_work_are_refused():
    config = ID3Config(budget=100_000)
    model = dt.adapt(_model(), config)
    with pytest.raises(ConfigError, match="only 168 exist"):
        config.training_callbacks(model, 10)
    with pytest.raises(ConfigError, match="not attached"):
        ID3Config().training_callbacks(model, 10)
    config = ID3Config(budget=1e-4)
    model = dt.adapt(_model(), config)
    with pytest.raises(ConfigError, match="selects nothing"):
        config.training_callbacks(model, 10)
    config = ID3Config()
    with pytest.raises(ConfigError, match="total_steps=0"):
        config.training_callbacks(dt.adapt(_model(), config), 0)
    with pytest.raises(ConfigError, match="lora_rank=4"):
        dt.adapt(_model(), ID3Config(parametrization="lora", lora_rank=4))

"""SaRA against float64 references: selection, sparse backprop, nuclear norm, progressive adjustment, files."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, TargetError
from deltatune.functional.sparse import scatter_matrix
from deltatune.methods.sara import SaRAConfig, SaRADelta


def _only_delta(model) -> SaRADelta:
    deltas = [d for _, _, d in dt.iter_deltas(model)]
    assert len(deltas) == 1
    return deltas[0]


def _fill(delta: SaRADelta, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta.values.copy_(torch.randn(delta.values.shape, generator=generator, dtype=delta.values.dtype))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 30), st.integers(2, 30), st.floats(0.02, 0.9), st.integers(0, 2**16))
def test_linear_equals_dense_reference_in_value_and_gradient(fan_in, fan_out, fraction, seed):
    if round(fraction * fan_in * fan_out) < 1:
        return
    torch.manual_seed(seed)
    layer = nn.Linear(fan_in, fan_out).double()
    model = dt.adapt(nn.Sequential(layer), SaRAConfig(fraction=fraction))
    delta = _only_delta(model)
    _fill(delta, seed)
    x = torch.randn(4, 3, fan_in, dtype=torch.float64, requires_grad=True)
    values = delta.values.detach().clone().requires_grad_(True)
    weight = layer.weight + scatter_matrix(values, delta.indices, (fan_out, fan_in))
    expected = F.linear(x, weight, layer.bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(model(x), (x, delta.values), grad_out)
    want = torch.autograd.grad(expected, (x, values), grad_out)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)


def test_conv_and_conv1d_hf_and_embedding_equal_references():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    model = dt.adapt(nn.Sequential(conv), SaRAConfig(fraction=0.3))
    delta = _only_delta(model)
    _fill(delta, 1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    weight = conv.weight + scatter_matrix(delta.values, delta.indices, (6, 2 * 9)).view(conv.weight.shape)
    torch.testing.assert_close(model(x), F.conv2d(x, weight, conv.bias, padding=1, groups=2), rtol=1e-12, atol=1e-12)

    from transformers.pytorch_utils import Conv1D

    hf = Conv1D(7, 5).double()  # weight (in=5, out=7)
    with torch.no_grad():
        hf.weight.normal_()
    model = dt.adapt(nn.Sequential(hf), SaRAConfig(fraction=0.4))
    delta = _only_delta(model)
    _fill(delta, 2)
    x = torch.randn(3, 5, dtype=torch.float64)
    matrix = hf.weight.T + scatter_matrix(delta.values, delta.indices, (7, 5))
    torch.testing.assert_close(model(x), x @ matrix.T + hf.bias, rtol=1e-12, atol=1e-12)

    embedding = nn.Embedding(11, 4).double()
    model = dt.adapt(nn.Sequential(embedding), SaRAConfig(fraction=0.2, layer_types=("embedding",)))
    delta = _only_delta(model)
    _fill(delta, 3)
    ids = torch.randint(0, 11, (2, 6))
    table = embedding.weight + scatter_matrix(delta.values, delta.indices, (4, 11)).T
    torch.testing.assert_close(model(ids), F.embedding(ids, table), rtol=1e-12, atol=1e-12)


def test_selection_takes_the_smallest_magnitudes_of_each_weight():
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    model = dt.adapt(nn.Sequential(layer), SaRAConfig(fraction=0.15))
    delta = _only_delta(model)
    magnitudes = layer.weight.detach().abs().reshape(-1)
    chosen = torch.zeros_like(magnitudes, dtype=torch.bool)
    chosen[delta.indices] = True
    assert delta.indices.numel() == round(0.15 * 1200)
    assert bool((delta.indices[1:] > delta.indices[:-1]).all())
    assert magnitudes[chosen].max() <= magnitudes[~chosen].min()
    torch.testing.assert_close(delta.base_values, layer.weight.detach().reshape(-1)[delta.indices])


def test_threshold_selects_every_entry_below_it():
    torch.manual_seed(0)
    layer = nn.Linear(50, 20)
    model = dt.adapt(nn.Sequential(layer), SaRAConfig(threshold=0.02))
    delta = _only_delta(model)
    expected = torch.nonzero(layer.weight.detach().abs().reshape(-1) < 0.02).reshape(-1)
    assert torch.equal(delta.indices, expected)


def test_gradients_and_optimizer_state_exist_only_for_selected_entries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8))
    dt.adapt(model, SaRAConfig(fraction=0.1, nuclear_weight=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 64)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    selected = {round(0.1 * 64 * 48), round(0.1 * 48 * 8)}
    sizes = {state["exp_avg"].numel() for state in optimizer.state.values()}
    assert sizes == selected
    assert all(state["exp_avg_sq"].numel() in selected for state in optimizer.state.values())
    for name, parameter in model.named_parameters():
        if not name.endswith(".values"):
            assert parameter.grad is None and parameter not in optimizer.state


def test_unselected_weights_never_change_and_the_update_merges_exactly():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    reference = copy.deepcopy(base)
    model = dt.adapt(base, SaRAConfig(fraction=0.2, nuclear_weight=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(8, 20, dtype=torch.float64)
    for _ in range(5):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    expected = model(x).detach()
    plain = dt.unload(model, merge=True)
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12)
    for (name, new), old in zip(plain.state_dict().items(), reference.state_dict().values()):
        changed = (new != old).reshape(-1)
        if name.endswith("weight"):
            assert 0 < int(changed.sum()) <= round(0.2 * new.numel())
        else:
            assert not changed.any()


def _square_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(80, 72), nn.Tanh(), nn.Linear(72, 70)).double()


def test_nuclear_norm_penalizes_the_selected_entries_and_reaches_the_values():
    model = dt.adapt(_square_model(), SaRAConfig(fraction=0.3, nuclear_weight=0.01))
    deltas = [d for _, _, d in dt.iter_deltas(model)]
    for delta in deltas:
        _fill(delta, 4)
    penalty = dt.regularization_loss(model)
    expected = sum(
        0.01 * torch.linalg.svdvals(scatter_matrix(d.base_values + d.values.detach(), d.indices, d.matrix_shape)).sum()
        for d in deltas
    )
    torch.testing.assert_close(penalty, expected, rtol=1e-10, atol=1e-12)
    penalty.backward()
    assert all(d.values.grad is not None and d.values.grad.abs().sum() > 0 for d in deltas)
    update_only = dt.adapt(_square_model(), SaRAConfig(fraction=0.3, nuclear_weight=0.01, nuclear_of="update"))
    assert float(dt.regularization_loss(update_only).detach()) == 0.0


def test_small_matrices_are_not_penalized():
    model = dt.adapt(_square_model(), SaRAConfig(fraction=0.3, nuclear_weight=0.01, nuclear_min_dim=70))
    deltas = [d for _, _, d in dt.iter_deltas(model)]
    assert [d.penalty_eligible() for d in deltas] == [True, False]


def test_conv_kernels_get_the_nuclear_norm_only_when_asked_as_in_the_official_code():
    """The official code penalizes 2-D parameters only; a conv kernel joins with nuclear_conv=True, as its
    (out, in/groups · kh · kw) matrix. A linear layer of the same matrix shape is penalized either way."""
    def model(**options):
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Conv2d(8, 12, 3), nn.Flatten(), nn.Linear(72, 12))
        adapted = dt.adapt(layers, SaRAConfig(fraction=0.3, nuclear_weight=0.01, nuclear_min_dim=4, **options))
        for delta in [d for _, _, d in dt.iter_deltas(adapted)]:
            _fill(delta, 5)
        return adapted

    assert SaRAConfig().nuclear_conv is False
    default = [d for _, _, d in dt.iter_deltas(model())]
    assert [d.matrix_shape for d in default] == [(12, 72), (12, 72)]
    assert [d.penalty_eligible() for d in default] == [False, True]
    conv, _ = deltas = [d for _, _, d in dt.iter_deltas(model(nuclear_conv=True))]
    assert [d.penalty_eligible() for d in deltas] == [True, True]
    conv.penalized = True
    expected = 0.01 * torch.linalg.svdvals(
        scatter_matrix(conv.base_values + conv.values.detach(), conv.indices, (12, 72)).double()).sum()
    torch.testing.assert_close(conv.regularization().double(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="nuclear_conv"):
        SaRAConfig(nuclear_conv="yes")


def test_schedule_penalizes_one_random_matrix_per_step_and_adjusts_at_half_training():
    config = SaRAConfig(fraction=0.3, nuclear_weight=0.01, seed=3)
    model = dt.adapt(_square_model(), config)
    (schedule,) = config.training_callbacks(model, total_steps=10)
    chosen = {id(schedule.choose_penalized()) for _ in range(20)}
    assert len(chosen) == 2
    assert sum(d.penalized for d in schedule.deltas) == 1
    optimizer = torch.optim.AdamW([d.values for d in schedule.deltas], lr=1.0)
    schedule.optimizer = optimizer
    model(torch.randn(4, 80, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert not schedule.adjust_if_due(4)
    assert schedule.adjust_if_due(5) and not schedule.adjust_if_due(6)
    assert not optimizer.state, "Adam state of the adapted values is rebuilt after the adjustment"


def test_progressive_adjustment_freezes_entries_that_left_the_range_and_keeps_their_values(tmp_path):
    reference = _square_model()
    model = dt.adapt(copy.deepcopy(reference), SaRAConfig(fraction=0.2))
    delta = [d for _, _, d in dt.iter_deltas(model)][0]
    limit = delta.selection_threshold()
    with torch.no_grad():
        delta.values.copy_(torch.linspace(-3 * limit, 3 * limit, delta.values.numel(), dtype=torch.float64))
    x = torch.randn(5, 80, dtype=torch.float64)
    before = model(x).detach()
    kept = delta.progressive_adjust()
    expected_active = (delta.base_values + delta.values).abs() <= limit
    assert torch.equal(delta.active, expected_active) and kept == int(expected_active.sum())
    assert 0 < kept < delta.values.numel()
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with torch.no_grad():  # whatever an optimizer does to frozen entries must not matter
        delta.values.add_(1.0)
    model(x).sum().backward()
    assert torch.all(delta.values.grad[~delta.active] == 0)
    after = model(x).detach()
    dt.save_adapter(model, tmp_path / "sara")
    loaded = dt.load_adapter(copy.deepcopy(reference), tmp_path / "sara")
    torch.testing.assert_close(loaded(x), after, rtol=0, atol=0)
    restored = [d for _, _, d in dt.iter_deltas(loaded)][0]
    for name in ("indices", "active", "frozen_values", "base_values", "values"):
        assert torch.equal(getattr(restored, name), getattr(delta, name)), name


def test_bfloat16_uses_the_dense_block_fallback():
    torch.manual_seed(0)
    layer = nn.Linear(24, 20).to(torch.bfloat16)
    model = dt.adapt(nn.Sequential(layer), SaRAConfig(fraction=0.25))
    delta = _only_delta(model)
    _fill(delta, 5)
    x = torch.randn(6, 24, dtype=torch.bfloat16)
    model(x).float().sum().backward()
    dense = (layer.weight.float() + scatter_matrix(delta.values.float(), delta.indices, (20, 24)))
    torch.testing.assert_close(model(x).float(), F.linear(x.float(), dense, layer.bias.float()), rtol=0.05, atol=0.05)
    assert delta.values.grad.dtype == torch.bfloat16 and delta.values.grad.shape == delta.values.shape


@pytest.mark.parametrize("field,value", [
    ("fraction", 0.0), ("fraction", 1.0), ("fraction", -0.2), ("threshold", 0.0), ("threshold", 1.5),
    ("nuclear_weight", -1.0), ("nuclear_of", "rank"), ("progressive_at", 1.0), ("progressive_at", 0.0),
])
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SaRAConfig(**{field: value})


def test_selections_that_pick_nothing_are_refused_and_the_model_is_unchanged():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with pytest.raises(ConfigError, match="threshold=1e-09 selects no entry"):
        dt.adapt(model, SaRAConfig(threshold=1e-9))
    with pytest.raises(ConfigError, match="fraction=0.001 selects no entry"):
        dt.adapt(model, SaRAConfig(fraction=0.001))
    assert all(type(m) in (nn.Sequential, nn.Linear) for m in model.modules())


def test_a_model_without_a_matching_weight_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(TargetError, match="matched no adaptable module"):
        dt.adapt(model, SaRAConfig())


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf"])
def test_fused_layer_path_equals_base_plus_sparse_update(kind):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = (nn.Linear(9, 7) if kind == "linear" else Conv1D(7, 9)).double()
    with torch.no_grad():
        layer.weight.normal_(), layer.bias.normal_()
    model = dt.adapt(nn.Sequential(layer), SaRAConfig(fraction=0.3))
    delta = _only_delta(model)
    _fill(delta, 6)
    base = model[0].base_layer
    x = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    fused = delta.forward_with_base(x, base)
    unfused = base(x) + delta(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(fused)
    got = torch.autograd.grad(fused, (x, delta.values), grad_out)
    want = torch.autograd.grad(unfused, (x, delta.values), grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    base.weight.requires_grad_(True)  # a trainable base weight still gets its (dense) gradient
    (weight_grad,) = torch.autograd.grad(delta.forward_with_base(x, base), (base.weight,), grad_out)
    (reference,) = torch.autograd.grad(base(x) + delta(x), (base.weight,), grad_out)
    torch.testing.assert_close(weight_grad, reference, rtol=1e-10, atol=1e-12)


def test_schedule_state_round_trips_through_its_state_dict():
    config = SaRAConfig(fraction=0.3, nuclear_weight=0.01, nuclear_min_dim=8)
    model = dt.adapt(nn.Sequential(*[nn.Linear(20, 20) for _ in range(5)]), config)
    (first,), (second,) = config.training_callbacks(model, 10), config.training_callbacks(model, 10)
    first.choose_penalized()
    second.load_state_dict(first.state_dict())
    picks = [[id(s.choose_penalized()) for _ in range(8)] for s in (first, second)]
    assert picks[0] == picks[1]

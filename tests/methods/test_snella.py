"""SNELL/SNELLA against float64 references: kernel, top-k sparsification, checkpointing, bi-level allocation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.methods.snella import SNELLAConfig, SNELLADelta


def _adapted(config, fan_in=20, fan_out=24, seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(fan_in, fan_out)).double()
    reference = copy.deepcopy(base)
    model = dt.adapt(base, config)
    return reference, model, next(dt.iter_deltas(model))[2]


def _reference_kernel(delta: SNELLADelta, mix: bool) -> torch.Tensor:
    heads, fan_in, _ = delta.in_factors.shape
    out = delta.out_factors.shape[1]
    kernel = torch.zeros(fan_in, out, dtype=torch.float64)
    for h in range(heads):
        for j in range(fan_in):
            for i in range(out):
                distance = (delta.in_factors[h, j] - delta.out_factors[h, i]).norm()
                kernel[j, i] += 0.1 * (-1) ** h * distance
    if mix:
        with torch.no_grad():
            delta.mix_alpha.fill_(0.7), delta.mix_gamma.fill_(1.3), delta.mix_beta.fill_(-0.05)
        kernel = kernel + 0.7 * torch.softmax(kernel / 1.3, dim=1) - 0.05
    return kernel


@pytest.mark.parametrize("mix", [False, True])
def test_kernel_and_forward_equal_the_reference(mix):
    reference, model, delta = _adapted(SNELLAConfig(rank=6, heads=2, mix=mix))
    kernel = _reference_kernel(delta, mix).detach()
    torch.testing.assert_close(delta.kernel().detach(), kernel, rtol=1e-10, atol=1e-12)
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x) + x @ kernel, rtol=1e-10, atol=1e-12)


def test_the_kernel_has_rank_well_above_the_factor_width():
    _, _, delta = _adapted(SNELLAConfig(rank=2, heads=2, mix=False))
    assert int(torch.linalg.matrix_rank(delta.kernel().detach())) > 4 * 2


@pytest.mark.parametrize("scaling", [False, True])
def test_top_k_keeps_the_largest_entries_of_the_layer(scaling):
    _, model, delta = _adapted(SNELLAConfig(rank=4, sparsity=0.25, allocate=False, magnitude_scaling=scaling))
    kernel = delta.kernel().detach()
    sparse = delta.sparse_kernel().detach()
    kept = sparse != 0
    assert int(kept.sum()) == kernel.numel() - int(0.25 * kernel.numel())
    assert kernel.abs()[kept].min() > kernel.abs()[~kept].max()
    expected = kernel * kernel.abs() if scaling else kernel
    torch.testing.assert_close(sparse[kept], expected[kept], rtol=0, atol=0)


def test_checkpointing_keeps_no_dense_kernel_for_backward_and_gives_the_same_gradients():
    grads = {}
    for use_checkpoint in (True, False):
        _, model, delta = _adapted(SNELLAConfig(rank=4, sparsity=0.5, allocate=False, checkpoint=use_checkpoint),
                                   fan_in=64, fan_out=48)
        saved: list[int] = []
        x = torch.randn(2, 64, dtype=torch.float64)
        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.square().sum().backward()
        grads[use_checkpoint] = [p.grad.clone() for p in delta.parameters()]
        if use_checkpoint:
            assert max(saved) < 64 * 48, "a dense kernel was kept for backward"
        else:
            assert max(saved) >= 64 * 48
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_allocation_tracks_importance_and_the_cubic_budget():
    torch.manual_seed(0)
    config = SNELLAConfig(rank=4, sparsity=0.0, target_sparsity=0.6, initial_warmup=0.2, allocation_interval=1)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).double()
    dt.adapt(model, config)
    (allocation,) = config.training_callbacks(model, total_steps=10)
    total = 2 * 256
    assert allocation.budget(2) == total
    assert allocation.budget(10) == round(0.4 * total)
    assert allocation.budget(6) == pytest.approx(0.4 * total + 0.6 * total * 0.5 ** 3, abs=1)
    x = torch.randn(8, 16, dtype=torch.float64)
    model(x).square().sum().backward()
    first = [(p.detach() * p.grad).abs() for d in allocation.deltas for p in d.importance_tensors()]
    allocation.on_backward_end()
    torch.testing.assert_close(allocation.importance[0][0], 0.15 * first[0])
    torch.testing.assert_close(allocation.uncertainty[0][0], 0.15 * (first[0] - 0.15 * first[0]).abs())
    volumes = list(allocation.allocate(10).values())
    kept = [d.kernel_size * (1 - float(d.sparsity)) for d in allocation.deltas]
    assert sum(kept) == pytest.approx(round(0.4 * total), abs=1e-6)
    scores = list(allocation.layer_scores().values())
    assert (volumes[0] > volumes[1]) == (scores[0] > scores[1])
    assert sum(volumes) == round(0.4 * total) and all(0 <= v <= 256 for v in volumes)


def test_sparsity_survives_save_and_load(tmp_path):
    reference, model, delta = _adapted(SNELLAConfig(rank=4, sparsity=0.2))
    delta.sparsity.fill_(0.37)
    x = torch.randn(3, 20, dtype=torch.float64)
    expected = model(x).detach()
    dt.save_adapter(model, tmp_path / "snella")
    loaded = dt.load_adapter(reference, tmp_path / "snella")
    assert float(next(dt.iter_deltas(loaded))[2].sparsity) == pytest.approx(0.37)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fields", [{"rank": 5, "heads": 2}, {"heads": 0}, {"sparsity": 1.0},
                                    {"target_sparsity": -0.1}, {"initial_warmup": 0.6, "final_warmup": 0.5},
                                    {"sparsity": 0.5, "target_sparsity": 0.3},
                                    {"beta1": 1.0}, {"allocation_interval": -1}, {"kernel_scale": 0.0}])
def test_bad_hyperparameters_name_the_field(fields):
    with pytest.raises(ConfigError, match="|".join(fields)):
        SNELLAConfig(**fields)


def test_allocation_needs_an_attached_config_and_steps():
    with pytest.raises(ConfigError, match="not attached"):
        SNELLAConfig().training_callbacks(nn.Linear(3, 3), 10)
    config = SNELLAConfig(rank=2)
    model = dt.adapt(nn.Sequential(nn.Linear(4, 4)), config)
    with pytest.raises(ConfigError, match="total_steps=0"):
        config.training_callbacks(model, 0)
    assert SNELLAConfig(allocate=False).training_callbacks(model, 10) == []


def _allocation_with_scores(layer_scores: list[float], target_sparsity: float = 0.6):
    """Two 16×16 layers whose S_ℓ = mean(ĪŪ)_A + mean(ĪŪ)_B is set by hand (Ī random, Ū scaled to it)."""
    torch.manual_seed(0)
    config = SNELLAConfig(rank=4, sparsity=0.0, target_sparsity=target_sparsity, allocation_interval=1)
    model = dt.adapt(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).double(), config)
    (allocation,) = config.training_callbacks(model, total_steps=10)
    generator = torch.Generator().manual_seed(3)
    allocation.importance, allocation.uncertainty = [], []
    for delta, score in zip(allocation.deltas, layer_scores):
        means = [torch.rand(p.shape, generator=generator, dtype=torch.float64) for p in delta.importance_tensors()]
        raw = sum(float(m.square().mean()) for m in means)  # with Ū = c·Ī, S_ℓ = c · Σ mean(Ī²)
        allocation.importance.append(means)
        allocation.uncertainty.append([m * (score / raw) for m in means])
    return allocation


def test_layer_scores_are_the_mean_of_importance_times_uncertainty_over_both_factors():
    allocation = _allocation_with_scores([1.0, 3.0])
    assert list(allocation.layer_scores().values()) == pytest.approx([1.0, 3.0], rel=1e-12)


def test_the_kept_volume_is_split_across_layers_in_proportion_to_their_scores():
    allocation = _allocation_with_scores([1.0, 3.0])
    budget = allocation.budget(10)
    assert budget == round(0.4 * 512) == 205
    # 205 · ¼ = 51.25 and 205 · ¾ = 153.75: largest remainder gives the extra unit to the second layer
    assert list(allocation.allocate(10).values()) == [51, 154]
    assert [float(d.sparsity) for d in allocation.deltas] == pytest.approx([1 - 51 / 256, 1 - 154 / 256])


def test_a_layer_whose_share_exceeds_its_size_is_capped_and_the_rest_re_split():
    allocation = _allocation_with_scores([1.0, 9.0], target_sparsity=0.3)
    budget = allocation.budget(10)  # 0.7 · 512 = 358: the second layer's share 322 > 256
    assert list(allocation.allocate(10).values()) == [budget - 256, 256]

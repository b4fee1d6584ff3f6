"""SSF: y = γ ⊙ base(x) + β against float64 references on every supported layer; the fold W' = diag(γ) W,
b' = γ ⊙ b + β is exact both ways; the official code's initialization; what cannot be folded is refused."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError, NotMergeableError, UnsupportedLayerError
from deltatune.methods.ssf import SSFConfig


def _randomized(model: nn.Module, seed: int = 0) -> dict[str, nn.Module]:
    """Give every SSF pair values far from the identity, so a missing γ or β shows."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {path: delta for path, _, delta in dt.iter_deltas(model)}
    with torch.no_grad():
        for delta in deltas.values():
            delta.ssf_scale.copy_(torch.rand(delta.ssf_scale.shape, generator=generator, dtype=torch.float64) + 0.5)
            delta.ssf_shift.copy_(torch.randn(delta.ssf_shift.shape, generator=generator, dtype=torch.float64))
    return deltas


def test_each_channel_of_linear_conv_and_conv1d_outputs_is_scaled_then_shifted():
    torch.manual_seed(0)
    model = nn.ModuleDict({"dense": nn.Linear(6, 5), "conv": nn.Conv2d(3, 4, 3), "gpt": Conv1D(7, 6)}).double()
    reference = copy.deepcopy(model)
    dt.adapt(model, SSFConfig())
    deltas = _randomized(model)
    x, maps = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for name, inputs in (("dense", x), ("gpt", x)):
        expected = reference[name](inputs) * deltas[name].ssf_scale + deltas[name].ssf_shift
        torch.testing.assert_close(model[name](inputs), expected, rtol=1e-12, atol=1e-12)
    scale, shift = deltas["conv"].ssf_scale.view(1, -1, 1, 1), deltas["conv"].ssf_shift.view(1, -1, 1, 1)
    torch.testing.assert_close(model["conv"](maps), reference["conv"](maps) * scale + shift, rtol=1e-12, atol=1e-12)


def test_merge_is_the_papers_fold_and_unmerge_restores_the_base_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 4), nn.Tanh(), Conv1D(2, 4)).double()
    base = copy.deepcopy(model.state_dict())
    dt.adapt(model, SSFConfig())
    deltas = _randomized(model, seed=3)
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    unmerged = model(x)
    dt.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-12, atol=1e-12)
    gamma, beta = deltas["2"].ssf_scale.detach(), deltas["2"].ssf_shift.detach()
    torch.testing.assert_close(model[2].weight.detach(), gamma[:, None] * base["2.weight"], rtol=1e-14, atol=0)
    torch.testing.assert_close(model[2].bias.detach(), gamma * base["2.bias"] + beta, rtol=1e-14, atol=1e-15)
    gpt_gamma = deltas["4"].ssf_scale.detach()  # transformers Conv1D keeps its weight as (in, out)
    torch.testing.assert_close(model[4].weight.detach(), base["4.weight"] * gpt_gamma[None, :], rtol=1e-14, atol=0)
    dt.unmerge(model)
    for key, value in base.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-13, atol=1e-14)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(out=st.integers(1, 6), fan_in=st.integers(1, 6), seed=st.integers(0, 2**16), bias=st.booleans())
def test_merged_equals_unmerged_for_random_shapes_and_values(out, fan_in, seed, bias):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(fan_in, out, bias=bias)).double()
    dt.adapt(model, SSFConfig(targets=["0"]))
    deltas = _randomized(model, seed)
    if not bias:
        with torch.no_grad():
            deltas["0"].ssf_shift.zero_()  # foldable only without a shift
    x = torch.randn(3, fan_in, dtype=torch.float64)
    expected = model(x)
    plain = dt.unload(model, merge=True)
    torch.testing.assert_close(plain(x), expected, rtol=1e-12, atol=1e-12)


def test_initialization_is_the_official_codes_normal_around_the_identity_and_seeded():
    def pairs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        model = dt.adapt(nn.Sequential(nn.Linear(4, 20_000)), SSFConfig(targets=["0"]))
        delta = next(delta for _, _, delta in dt.iter_deltas(model))
        return delta.ssf_scale.detach().clone(), delta.ssf_shift.detach().clone()

    scale, shift = pairs(0)
    assert abs(scale.mean().item() - 1) < 1e-3 and abs(scale.std().item() - 0.02) < 1e-3
    assert abs(shift.mean().item()) < 1e-3 and abs(shift.std().item() - 0.02) < 1e-3
    again, _ = pairs(0)
    assert torch.equal(scale, again) and not torch.equal(scale, pairs(1)[0])
    torch.manual_seed(0)
    identity = dt.adapt(nn.Sequential(nn.Linear(3, 2)), SSFConfig(init_std=0.0))
    delta = next(delta for _, _, delta in dt.iter_deltas(identity))
    assert torch.equal(delta.ssf_scale, torch.ones(2)) and torch.equal(delta.ssf_shift, torch.zeros(2))


def test_only_the_pairs_train_two_per_output_channel():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 3), nn.LayerNorm(3))
    dt.adapt(model, SSFConfig(layer_types=("linear",)))
    assert dt.trainable_parameters(model).trainable == 2 * 6 + 2 * 6 + 2 * 3
    model(torch.randn(2, 8)).sum().backward()
    named = dict(model.named_parameters())
    assert all((p.grad is not None) == p.requires_grad for p in named.values())
    assert {name.rsplit(".", 1)[-1] for name, p in named.items() if p.requires_grad} == {"ssf_scale", "ssf_shift"}


def test_save_then_load_reproduces_the_outputs(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 2)).double()
    fresh = copy.deepcopy(model)
    dt.adapt(model, SSFConfig())
    _randomized(model, seed=5)
    dt.save_adapter(model, tmp_path / "ssf")
    dt.load_adapter(fresh, tmp_path / "ssf")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_shift_on_a_layer_without_bias_refuses_to_merge_and_changes_nothing():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    dt.adapt(model, SSFConfig(targets=["0"]))
    _randomized(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotMergeableError, match="bias"):
        dt.merge(model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_zero_scale_cannot_be_unmerged():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    dt.adapt(model, SSFConfig(targets=["0"]))
    delta = next(delta for _, _, delta in dt.iter_deltas(model))
    with torch.no_grad():
        delta.ssf_scale[0] = 0.0
    dt.merge(model)
    with pytest.raises(NotMergeableError, match="scale of exactly 0"):
        dt.unmerge(model)


def test_bad_hyper_parameters_and_layers_are_refused_by_name():
    with pytest.raises(ConfigError, match="init_std"):
        SSFConfig(init_std=-0.1)
    with pytest.raises(UnsupportedLayerError):
        dt.adapt(nn.Sequential(nn.Embedding(5, 3)), SSFConfig(targets=["0"]))


def test_the_config_is_reachable_from_the_package_root():
    assert dt.SSFConfig is SSFConfig and dt.method_entry("ssf").config_cls is SSFConfig


# --- after a LayerNorm / BatchNorm: the pair folds into the norm's affine parameters ----------------------------
def _norms() -> nn.ModuleDict:
    torch.manual_seed(4)
    norms = nn.ModuleDict({"ln": nn.LayerNorm(5), "ln2d": nn.LayerNorm((3, 5)), "bn": nn.BatchNorm2d(4),
                           "bn1d": nn.BatchNorm1d(4)}).double()
    with torch.no_grad():
        for norm in norms.values():
            norm.weight.normal_(1, 0.5)
            norm.bias.normal_(0, 0.5)
        for bn in (norms["bn"], norms["bn1d"]):  # inference statistics far from (0, 1)
            bn.running_mean.normal_(0, 1)
            bn.running_var.uniform_(0.5, 2)
    return norms.eval()


def _norm_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)
    return {"ln": draw(2, 7, 5), "ln2d": draw(2, 3, 5), "bn": draw(2, 4, 3, 3), "bn1d": draw(6, 4)}


def test_after_a_norm_the_pair_scales_its_channels_and_folds_into_its_affine_parameters():
    norms, inputs = _norms(), _norm_inputs()
    base = copy.deepcopy(norms.state_dict())
    reference = copy.deepcopy(norms)
    dt.adapt(norms, SSFConfig(layer_types=("layer_norm", "batch_norm")))
    deltas = _randomized(norms, seed=6)
    shapes = {"ln": (-1,), "ln2d": (-1,), "bn": (1, -1, 1, 1), "bn1d": (1, -1)}  # the channel dimension
    for name, x in inputs.items():
        gamma, beta = deltas[name].ssf_scale.view(shapes[name]), deltas[name].ssf_shift.view(shapes[name])
        torch.testing.assert_close(norms[name](x), reference[name](x) * gamma + beta, rtol=1e-12, atol=1e-12)
    expected = {name: norms[name](x).detach() for name, x in inputs.items()}
    dt.merge(norms)
    for name, x in inputs.items():
        torch.testing.assert_close(norms[name](x), expected[name], rtol=1e-12, atol=1e-12)
        gamma, beta = deltas[name].ssf_scale.detach(), deltas[name].ssf_shift.detach()
        torch.testing.assert_close(norms[name].weight.detach(), gamma * base[f"{name}.weight"], rtol=1e-14, atol=0)
        torch.testing.assert_close(norms[name].bias.detach(), gamma * base[f"{name}.bias"] + beta, rtol=1e-14,
                                   atol=1e-15)
    dt.unmerge(norms)
    for key, value in base.items():
        torch.testing.assert_close(norms.state_dict()[key], value, rtol=1e-13, atol=1e-14)


def test_the_default_targets_follow_every_op_norms_included():
    block = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.Conv1d(6, 6, 1), nn.BatchNorm1d(6), nn.Tanh())
    dt.adapt(block, SSFConfig())
    assert sorted(path for path, _, _ in dt.iter_deltas(block)) == ["0", "1", "2", "3"]


@pytest.mark.parametrize("norm", [nn.LayerNorm(4, elementwise_affine=False), nn.BatchNorm1d(4, affine=False)])
def test_a_norm_without_affine_parameters_merges_only_the_identity_pair(norm):
    model = nn.Sequential(nn.Linear(4, 4), norm).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    dt.adapt(model, SSFConfig(targets=["1"], init_std=0.0))
    dt.merge(model)  # the identity has nowhere to go and needs nowhere: a no-op
    dt.unmerge(model)
    _randomized(model)
    expected = model(x).detach()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotMergeableError, match="without affine parameters"):
        dt.merge(model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_shift_after_a_layernorm_without_bias_refuses_to_merge():
    model = nn.Sequential(nn.LayerNorm(4, bias=False)).double()
    dt.adapt(model, SSFConfig(targets=["0"]))
    _randomized(model)
    with pytest.raises(NotMergeableError, match="bias"):
        dt.merge(model)

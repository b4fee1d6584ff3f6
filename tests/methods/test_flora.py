"""FLoRA against a hand-written float64 reference of the Tucker product (every mode named, so a factor applied to the
wrong mode, a missed in/out swap or the official in_channels-for-groups bug fails), on Linear, transformers Conv1D
and Conv1d/2d/3d with groups 1, 2 and depthwise; the official init and ranks; refusals; save -> load."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError, UnsupportedLayerError
from deltatune.methods.flora import FLoRAConfig

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
KERNEL_LETTERS = "hwd"


def _randomized(model: nn.Module, seed: int = 1) -> None:
    """Every FLoRA tensor random (the core too: at init it is zero and the update vanishes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "flora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _delta(model: nn.Module):
    return next(iter(dt.iter_deltas(model)))[2]


def reference_update(delta, scale: float) -> torch.Tensor:
    """s · Σ G[a, b, c...] U_in[i, a] U_out[o, b] U_k1[h, c] ..., written out as one einsum in the layer's
    (out, in/groups, k...) layout."""
    core = delta.flora_core.detach()
    factors = [getattr(delta, f"flora_factor_{n}").detach() for n in range(core.dim())]
    kernel = KERNEL_LETTERS[: core.dim() - 2]
    core_letters = "ab" + "".join(letter.upper() for letter in kernel)
    operands = ",".join([core_letters, "ia", "ob"] + [f"{k}{k.upper()}" for k in kernel])
    return scale * torch.einsum(f"{operands}->oi{kernel}", core, *factors)


def _conv_model(dims: int, in_channels: int, out_channels: int, groups: int, kernel, **args) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(CONVS[dims](in_channels, out_channels, kernel, groups=groups, **args)).double()


def _check_conv_against_reference(model: nn.Module, config: FLoRAConfig, x: torch.Tensor) -> None:
    base = copy.deepcopy(model)
    adapted = dt.adapt(model, config)
    _randomized(adapted)
    delta, conv = _delta(adapted), base[0]
    update = reference_update(delta, config.scale)
    assert update.shape == conv.weight.shape  # (out, in/groups, k...); the official code sizes in as in_channels
    torch.testing.assert_close(delta.delta_weight(conv.weight), update, rtol=1e-12, atol=1e-12)
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.weight.dim() - 2]
    expected = conv_fn(x, conv.weight + update, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    torch.testing.assert_close(adapted(x), expected, rtol=1e-10, atol=1e-10)
    dt.merge(adapted)
    torch.testing.assert_close(adapted(x), expected, rtol=1e-10, atol=1e-10)
    dt.unmerge(adapted)
    torch.testing.assert_close(adapted.state_dict()["0.weight"], conv.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 6], ids=["groups=1", "groups=2", "depthwise"])
def test_conv2d_is_the_tucker_product_for_groups_one_two_and_depthwise(groups):
    # kernel (3, 2): a kernel-mode mix-up changes shapes or values; stride, padding, dilation are the layer's
    model = _conv_model(2, 6, 6, groups, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _check_conv_against_reference(model, FLoRAConfig(targets=None, rank=3, kernel_rank=2, scale=1.7), x)


@pytest.mark.parametrize("dims,kernel,groups", [(1, 3, 1), (1, 3, 2), (3, (2, 3, 2), 1), (3, (2, 3, 2), 4)])
def test_conv1d_and_conv3d_keep_every_kernel_mode(dims, kernel, groups):
    model = _conv_model(dims, 4, 8, groups, kernel, padding=1)
    x = torch.randn(2, 4, *([5] * dims), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _check_conv_against_reference(model, FLoRAConfig(targets=None, rank=3, scale=0.5), x)
    expected_core = (1 if groups == 4 else min(3, 4 // groups), 3, *([2] * dims))  # ranks capped at the mode sizes
    assert tuple(_delta(dt.adapt(_conv_model(dims, 4, 8, groups, kernel), FLoRAConfig(targets=None, rank=3)))
                 .flora_core.shape) == expected_core


@pytest.mark.parametrize("layer", ["linear", "conv1d_hf"])
def test_dense_layers_are_s_u_out_g_transposed_u_in_transposed(layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5) if layer == "linear" else Conv1D(5, 7)).double()
    base = copy.deepcopy(model)
    adapted = dt.adapt(model, FLoRAConfig(targets=None, rank=3, scale=2.5))
    _randomized(adapted)
    delta = _delta(adapted)
    update = 2.5 * delta.flora_factor_1 @ delta.flora_core.T @ delta.flora_factor_0.T  # (out, in)
    x = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(adapted(x), base(x) + x @ update.T, rtol=1e-12, atol=1e-12)
    native = update if layer == "linear" else update.T
    torch.testing.assert_close(delta.delta_weight(base[0].weight), native.detach(), rtol=1e-12, atol=1e-12)


def test_the_update_is_zero_at_init_with_the_official_factor_scales():
    model = _conv_model(2, 64, 96, 1, 3)
    adapted = dt.adapt(copy.deepcopy(model), FLoRAConfig(targets=None, rank=32, kernel_rank=3))
    delta = _delta(adapted)
    assert torch.count_nonzero(delta.flora_core) == 0
    x = torch.randn(1, 64, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(adapted(x), model(x), rtol=0, atol=0)
    # Kaiming-normal with a = √3 over (I_n, r_n): std = sqrt(2 / (1 + 3)) / sqrt(r_n)
    for factor, rank in ((delta.flora_factor_0, 32), (delta.flora_factor_1, 32)):
        assert float(factor.detach().std()) == pytest.approx(1 / math.sqrt(2 * rank), rel=0.1)


def test_defaults_are_the_official_ones_and_ranks_are_capped_per_mode():
    config = FLoRAConfig()
    assert (config.rank, config.kernel_rank, config.scale, config.dropout) == (8, 2, 4.0, 0.0)
    adapted = dt.adapt(nn.Sequential(nn.Conv2d(1, 32, 3), nn.Conv2d(32, 16, 1)),
                       FLoRAConfig(targets=None, layer_types=("conv",)))
    deltas = {path: delta for path, _, delta in dt.iter_deltas(adapted)}
    assert tuple(deltas["0"].flora_core.shape) == (1, 8, 2, 2)
    assert tuple(deltas["1"].flora_core.shape) == (8, 8, 1, 1)
    counted = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    paper = (1 * 8 * 4 + 1 * 1 + 32 * 8 + 2 * 3 * 2) + (8 * 8 + 32 * 8 + 16 * 8 + 2 * 1)  # Π r_n + Σ I_n r_n
    assert counted == paper


def test_embeddings_are_refused_by_name_and_configs_are_checked():
    with pytest.raises(UnsupportedLayerError, match="flora cannot adapt .*Embedding.*nn.Conv1d/2d/3d"):
        dt.adapt(nn.Sequential(nn.Embedding(10, 4)), FLoRAConfig(targets=["0"]))
    for field, value in (("rank", 0), ("kernel_rank", 0), ("scale", 0.0), ("dropout", 1.0), ("init", "zeros")):
        with pytest.raises(ConfigError, match=field):
            FLoRAConfig(**{field: value})


def test_save_then_load_gives_identical_outputs_on_a_depthwise_model(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Tanh(), nn.Conv2d(4, 6, 3)).double()
    adapted = dt.adapt(copy.deepcopy(base), FLoRAConfig(targets=None, layer_types=("conv",), rank=2))
    _randomized(adapted)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    dt.save_adapter(adapted, tmp_path / "flora")
    loaded = dt.load_adapter(copy.deepcopy(base), tmp_path / "flora")
    torch.testing.assert_close(loaded(x), adapted(x), rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 2, 0]),
       st.integers(1, 3), st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.integers(0, 1))
def test_any_conv_equals_the_dense_reference(dims, per_group_in, per_group_out, groups, kernel, stride, rank,
                                             kernel_rank, padding):
    groups = groups or 3  # 0: a third grouping
    in_channels, out_channels = per_group_in * groups, per_group_out * groups
    model = _conv_model(dims, in_channels, out_channels, groups, kernel, stride=stride, padding=padding)
    size = kernel + 2
    x = torch.randn(2, in_channels, *([size] * dims), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _check_conv_against_reference(model, FLoRAConfig(targets=None, rank=rank, kernel_rank=kernel_rank), x)

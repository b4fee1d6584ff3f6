"""LoRA against hand-written float64 references, over random shapes (hypothesis)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deltatune as dt

shapes = st.tuples(st.integers(2, 24), st.integers(2, 24), st.integers(1, 6), st.floats(0.5, 32), st.booleans())


def _randomize(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for p in delta.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_linear_equals_reference(shape, seed):
    fan_in, fan_out, rank, alpha, rslora = shape
    rank = min(rank, min(fan_in, fan_out) - 1)
    if rank < 1:
        return
    layer = nn.Linear(fan_in, fan_out).double()
    model = dt.adapt(nn.Sequential(layer), dt.LoRAConfig(rank=rank, alpha=alpha, rslora=rslora))
    _randomize(model, seed)
    delta = next(dt.iter_deltas(model))[2]
    x = torch.randn(3, fan_in, dtype=torch.float64)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    expected = x @ (layer.weight + scale * delta.lora_B @ delta.lora_A).T + layer.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2), st.integers(0, 2**16))
def test_conv2d_equals_reference(rank, kernel, padding, stride, seed):
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding).double()
    model = dt.adapt(nn.Sequential(conv), dt.LoRAConfig(rank=rank, alpha=2.0, targets=None, layer_types=("conv",)))
    _randomize(model, seed)
    delta = next(dt.iter_deltas(model))[2]
    delta_weight = (delta.lora_B.flatten(1) @ delta.lora_A.flatten(1)).reshape(conv.weight.shape) * (2.0 / rank)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    expected = F.conv2d(x, conv.weight + delta_weight, conv.bias, stride=stride, padding=padding)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**16))
def test_embedding_equals_reference(rank, seed):
    embedding = nn.Embedding(12, 8, padding_idx=0).double()
    model = dt.adapt(nn.Sequential(embedding), dt.LoRAConfig(rank=rank, targets=None, layer_types=("embedding",)))
    _randomize(model, seed)
    delta = next(dt.iter_deltas(model))[2]
    ids = torch.randint(0, 12, (3, 5))
    table = embedding.weight + (delta.lora_B @ delta.lora_A).T * (8.0 / rank)
    torch.testing.assert_close(model(ids), table[ids], rtol=1e-12, atol=1e-12)


def test_default_init_is_kaiming_a_and_zero_b():
    model = dt.adapt(nn.Sequential(nn.Linear(64, 32)), dt.LoRAConfig(rank=8))
    delta = next(dt.iter_deltas(model))[2]
    assert torch.count_nonzero(delta.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) on fan_in 64
    assert delta.lora_A.abs().max() <= bound and delta.lora_A.std() > bound / 3


def test_gaussian_init_has_std_one_over_rank():
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(512, 512)), dt.LoRAConfig(rank=4, init="gaussian"))
    delta = next(dt.iter_deltas(model))[2]
    assert abs(delta.lora_A.std().item() - 0.25) < 0.01


def test_dropout_applies_only_in_training_on_the_lora_branch():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16).double()
    model = dt.adapt(nn.Sequential(layer), dt.LoRAConfig(rank=4, dropout=0.5, init="random"))
    x = torch.randn(8, 16, dtype=torch.float64)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    with dt.disabled(model):
        torch.testing.assert_close(model(x), layer(x))


def test_hf_conv1d_uses_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(10, 6).double()  # in 6 -> out 10, weight (6, 10)
    with torch.no_grad():
        conv.bias.normal_()
    model = dt.adapt(nn.Sequential(conv), dt.LoRAConfig(rank=2, init="random"))
    delta = next(dt.iter_deltas(model))[2]
    assert tuple(delta.lora_A.shape) == (2, 6) and tuple(delta.lora_B.shape) == (10, 2)
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = x @ (conv.weight + (delta.lora_B @ delta.lora_A).T * 4.0) + conv.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_lora_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = dt.adapt(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), dt.LoRAConfig(rank=2, init="random"))
    x = torch.randn(3, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))

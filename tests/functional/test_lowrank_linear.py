"""The fused low-rank linear (functional.lowrank.lowrank_linear) and when LoRA uses it."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.functional.lowrank import lowrank_linear


def _tensors(seed: int, dtype=torch.float64, bias: bool = True):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return draw(2, 5, 7), draw(6, 7), draw(6) if bias else None, draw(3, 7), draw(6, 3)


def _reference(x, weight, bias, down, up, scale):
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, down), up)


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=5) if any(n)])
def test_gradients_match_autograd_for_every_subset_of_inputs(needs):
    tensors = [t.requires_grad_(need) for t, need in zip(_tensors(0), needs)]
    torch.autograd.gradcheck(lambda *ts: lowrank_linear(*ts, 1.7), tensors)
    fused = lowrank_linear(*tensors, 1.7)
    reference = _reference(*tensors, 1.7)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    wanted = [t for t in tensors if t.requires_grad]
    cotangent = torch.randn_like(fused)
    ours = torch.autograd.grad(fused, wanted, cotangent)
    theirs = torch.autograd.grad(reference, wanted, cotangent)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_without_bias_and_with_a_transposed_weight_view():
    x, weight, _, down, up = _tensors(1, bias=False)
    native = weight.t().contiguous().requires_grad_(True)  # a (in, out) weight, as transformers' Conv1D stores it
    torch.autograd.gradcheck(lambda w, a: lowrank_linear(x, w.t(), None, a, up, 0.5), [native, down.requires_grad_()])


def test_double_backward_raises_instead_of_being_wrong():
    x, weight, bias, down, up = _tensors(2)
    down.requires_grad_(True)
    (grad,) = torch.autograd.grad(lowrank_linear(x, weight, bias, down, up, 2.0).sum(), down, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def _adapted(dropout: float = 0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    return dt.adapt(model, dt.LoRAConfig(rank=2, dropout=dropout, init="random"))


def _top_node(model, x):
    return type(model(x).grad_fn).__name__


def test_lora_fuses_plain_linears_and_falls_back_otherwise():
    model = _adapted()
    x = torch.randn(3, 8, dtype=torch.float64)
    assert _top_node(model, x) == "_LowRankLinearBackward"
    model[2].base_layer.register_forward_hook(lambda module, args, out: out)
    assert _top_node(model, x) != "_LowRankLinearBackward"  # hooks on the base layer must still run

    dropped = _adapted(dropout=0.5)
    assert _top_node(dropped, x) != "_LowRankLinearBackward"  # dropout on the branch: unfused
    dropped.eval()
    assert _top_node(dropped, x) == "_LowRankLinearBackward"


def test_fused_and_unfused_models_train_identically():
    fused, unfused = _adapted(), _adapted()
    for _, host in dt.core.model.iter_hosts(unfused):
        host._fuse_first_additive = False
    x = torch.randn(5, 8, dtype=torch.float64)
    for model in (fused, unfused):
        model(x).square().sum().backward()
    torch.testing.assert_close(fused(x), unfused(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(fused.parameters(), unfused.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch's generic fallback for addmm_
def test_torch_func_grad_and_vmap_agree_with_the_composition():
    x, weight, bias, down, up = _tensors(3)

    def loss(fn):
        return lambda a, b, inputs: fn(inputs, weight, bias, a, b, 0.9).square().sum()

    ours = torch.func.vmap(torch.func.grad(loss(lowrank_linear), argnums=(0, 1)), in_dims=(None, None, 0))
    theirs = torch.func.vmap(torch.func.grad(loss(_reference), argnums=(0, 1)), in_dims=(None, None, 0))
    for a, b in zip(ours(down, up, x), theirs(down, up, x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_autocast_runs_unfused_and_trains():
    model = _adapted().float()
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _top_node(model, x) != "_LowRankLinearBackward"
        model(x).float().sum().backward()

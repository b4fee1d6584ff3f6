"""The fixed-slot delta body, the ∂L/∂ΔW probe and the restart warm-up, against float64 references."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from contract.toy_models import build
from deltatune.allocate.growth import UpdateWarmup
from deltatune.allocate.probes import DeltaGradientProbe
from deltatune.allocate.slots import orthogonality_penalty
from deltatune.methods.increlora import IncreLoRAConfig
from deltatune.methods.triadaptlora import TriAdaptLoRAConfig


def _perturbed(case: str, config):
    model, x = build(case)
    dt.adapt(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in delta.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model, x


@pytest.mark.parametrize("case", ["linear", "conv1d_hf", "conv", "embedding"])
def test_probe_gradient_equals_autograd_through_a_materialized_delta(case):
    config = TriAdaptLoRAConfig(targets=None, layer_types=({"conv1d_hf": "conv1d_hf"}.get(case, case),),
                                init_rank=2, target_rank=3)
    model, x = _perturbed(case, config)
    (path, _, delta), *_ = dt.iter_deltas(model)
    probe = DeltaGradientProbe({path: delta})
    model(x).square().sum().backward()
    probed = probe.delta_gradient(delta)
    probe.close()
    leaf = delta.delta_weight(torch.empty(0, dtype=torch.float64)).detach().requires_grad_(True)
    handle = delta.register_forward_hook(lambda module, inputs, output: module.layer.op(inputs[0], leaf, None))
    model(x).square().sum().backward()
    handle.remove()
    torch.testing.assert_close(probed, delta.layer.to_matrix(leaf.grad), rtol=1e-10, atol=1e-12)
    assert path == "first"  # the model's input is this delta's input: activation path == weight path on it
    torch.testing.assert_close(delta(x), delta.layer.op(x, leaf.detach(), None), rtol=1e-10, atol=1e-12)


def test_probe_ignores_passes_without_gradients():
    model, x = _perturbed("linear", TriAdaptLoRAConfig(targets=None, init_rank=2, target_rank=3))
    (path, _, delta), *_ = dt.iter_deltas(model)
    probe = DeltaGradientProbe({path: delta})
    with torch.no_grad():
        model(x)
    assert not probe.has_gradient(delta) and probe.delta_gradient(delta) is None


def test_orthogonality_penalty_by_hand():
    down = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    up = torch.eye(2, dtype=torch.float64)
    assert orthogonality_penalty(down, up, squared=True).item() == pytest.approx(9.0)
    assert orthogonality_penalty(down, up, squared=False).item() == pytest.approx(3.0)
    live_first = torch.tensor([True, False])
    assert orthogonality_penalty(down, up, live_first, squared=False).item() == pytest.approx(0.0)


def test_restart_warmup_scales_the_update_of_new_components():
    model, _ = _perturbed("linear", IncreLoRAConfig(targets=None, init_rank=1, target_rank=2))
    (path, _, delta), *_ = dt.iter_deltas(model)
    delta.grow_rank(1, step=5)  # slot 1 becomes live at step 5; a fresh reserve starts training at 5
    factors = delta.update_factors(7, 4)
    assert factors["lora_E"].tolist()[:3] == [1.0, 0.25, 1.0]  # (7 − 5 − 1) / 4 for the new component
    assert factors["lora_A"].tolist()[2] == 0.25                 # the new reserve's rows warm up too
    warmup = UpdateWarmup(4)
    warmup.snapshot({path: delta}, 6)
    before = delta.lora_E.detach().clone()
    with torch.no_grad():
        delta.lora_E.add_(1.0)  # what an optimizer step would do
    warmup.apply({path: delta}, 7)
    expected = before.reshape(-1) + factors["lora_E"]
    torch.testing.assert_close(delta.lora_E.reshape(-1), expected)


def test_growth_initialization_is_reproducible():
    first, _ = _perturbed("linear", TriAdaptLoRAConfig(targets=None, init_rank=1, target_rank=4))
    second, _ = _perturbed("linear", TriAdaptLoRAConfig(targets=None, init_rank=1, target_rank=4))
    for (_, _, a), (_, _, b) in zip(dt.iter_deltas(first), dt.iter_deltas(second)):
        a.grow_rank(2, step=9)
        b.grow_rank(2, step=9)
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_C_lower, b.lora_C_lower)

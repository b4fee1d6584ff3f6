"""The whole delta contract: WEIGHT, ADDITIVE and OUTPUT deltas stacked on one layer compose in the documented
order (core/delta.py: weight-space first, then added outputs, then output transforms; within a kind, the active
set's order), merge and unmerge through the public API, and a non-mergeable delta refuses without touching the
model. Fused (`FusesWithBase`) == unfused for every method that fuses, forward and gradients, in float64.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from contract.toy_deltas import toy_methods  # noqa: F401  (the fixture)
from contract.toy_models import LAYER_CASES, build
from deltatune.core.capabilities import FusesWithBase
from deltatune.core.model import iter_hosts
from deltatune.errors import NotMergeableError
from deltatune.merging.adapters import combine_adapters

pytestmark = pytest.mark.usefixtures("toy_methods")


def _one_layer(bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5, bias=bias)).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    return model, x


def _perturb(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model, name):
            for parameter in delta.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _stack(model, output_method: str = "toy_affine_output"):
    """A weight, an additive and an output delta on layer "0", each moved away from its start."""
    dt.adapt(model, dt.config_for("toy_weight_scale", targets=["0"]), name="weight")
    dt.adapt(model, dt.LoRAConfig(rank=2, alpha=4.0, init="random", targets=["0"]), name="additive")
    dt.adapt(model, dt.config_for(output_method, targets=["0"]), name="output")
    for seed, name in enumerate(("weight", "additive", "output")):
        _perturb(model, name, seed + 1)
    return {name: model[0].deltas[name] for name in ("weight", "additive", "output")}


def _by_hand(base: nn.Linear, deltas, x: torch.Tensor) -> torch.Tensor:
    """The documented order written out: W' = W ⊙ (1 + F); y = x W'ᵀ + b; y += 2·B A x; y = y ⊙ s + t."""
    weight, additive, output = deltas["weight"], deltas["additive"], deltas["output"]
    y = F.linear(x, base.weight * (1 + weight.factor), base.bias)
    y = y + 2.0 * x @ additive.lora_A.T @ additive.lora_B.T
    return y * output.gain + output.shift


def test_weight_additive_and_output_deltas_compose_in_the_documented_order_whatever_the_active_order():
    model, x = _one_layer()
    base = copy.deepcopy(model[0])
    deltas = _stack(model)
    expected = _by_hand(base, deltas, x)
    for order in (["weight", "additive", "output"], ["output", "additive", "weight"], ["additive", "output", "weight"]):
        dt.set_active(model, order)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    shift_first = (F.linear(x, base.weight * (1 + deltas["weight"].factor), base.bias) * deltas["output"].gain
                   + deltas["output"].shift + 2.0 * x @ deltas["additive"].lora_A.T @ deltas["additive"].lora_B.T)
    assert not torch.allclose(model(x), shift_first), "the order is visible in the output"


def test_two_output_deltas_apply_in_the_active_sets_order():
    model, x = _one_layer()
    base = copy.deepcopy(model[0])
    dt.adapt(model, dt.config_for("toy_affine_output", targets=["0"]), name="affine")
    dt.adapt(model, dt.config_for("toy_tanh_gate", targets=["0"]), name="gate")
    _perturb(model, "affine", 1)
    _perturb(model, "gate", 2)
    affine, gate = model[0].deltas["affine"], model[0].deltas["gate"]
    y = base(x)
    dt.set_active(model, ["affine", "gate"])
    scaled = y * affine.gain + affine.shift
    torch.testing.assert_close(model(x), scaled + gate.gate * torch.tanh(scaled), rtol=0, atol=1e-12)
    dt.set_active(model, ["gate", "affine"])
    gated = y + gate.gate * torch.tanh(y)
    torch.testing.assert_close(model(x), gated * affine.gain + affine.shift, rtol=0, atol=1e-12)


def test_the_stack_merges_into_the_folded_weight_and_bias_and_unmerges_to_the_base():
    model, x = _one_layer()
    base = copy.deepcopy(model[0])
    deltas = _stack(model)
    dt.set_active(model, ["output", "weight", "additive"])
    expected = model(x).detach()
    dt.merge(model)
    gain, shift = deltas["output"].gain, deltas["output"].shift
    lora = deltas["additive"]
    folded = gain[:, None] * (base.weight * (1 + deltas["weight"].factor) + 2.0 * lora.lora_B @ lora.lora_A)
    torch.testing.assert_close(model[0].base_layer.weight, folded, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[0].base_layer.bias, gain * base.bias + shift, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    dt.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, base.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[0].base_layer.bias, base.bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    plain = dt.unload(model, merge=True)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12)


def test_an_affine_output_delta_merges_on_a_layer_without_bias_only_while_its_shift_is_zero():
    model, x = _one_layer(bias=False)
    dt.adapt(model, dt.config_for("toy_affine_output", targets=["0"]))
    with torch.no_grad():
        model[0].deltas["default"].gain.uniform_(0.5, 1.5)
    expected = model(x).detach()
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    dt.unmerge(model)
    with torch.no_grad():
        model[0].deltas["default"].shift.fill_(0.1)
    dt.adapt(model, dt.config_for("toy_weight_scale", targets=["0"]), name="weight")
    _perturb(model, "weight", 1)
    dt.set_active(model, ["default", "weight"])  # the weight delta folds first, then the shift refuses
    expected = model(x).detach()
    weight = model[0].base_layer.weight.detach().clone()
    with pytest.raises(NotMergeableError, match="changes a bias the base layer does not have"):
        dt.merge(model)
    assert torch.equal(model[0].base_layer.weight, weight) and model[0].merged == ()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_layer_that_refuses_late_rolls_back_the_layers_merged_before_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    dt.adapt(model, dt.LoRAConfig(rank=2, bias=True, init="random", targets=["0", "2"]))
    _perturb(model, "default", 1)
    expected = model(x).detach()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match="changes a bias the base layer does not have"):
        dt.merge(model)
    assert model[0].merged == () and model[2].merged == ()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-15)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-15)
    with pytest.raises(NotMergeableError):
        dt.unload(model, merge=True)
    assert all(type(model[i]).__name__ == "AdaptedLayer" for i in (0, 2)), "a refused unload removes no wrapper"


def test_a_non_mergeable_output_delta_refuses_merge_and_leaves_every_layer_untouched():
    model, x = build("linear")
    dt.adapt(model, dt.config_for("toy_weight_scale", targets=["first", "second"]), name="weight")
    dt.adapt(model, dt.config_for("toy_tanh_gate", targets=["second"]), name="gate")
    _perturb(model, "weight", 1)
    _perturb(model, "gate", 2)
    dt.set_active(model, ["weight", "gate"])
    expected = model(x).detach()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(NotMergeableError, match="ToyTanhGateDelta on second cannot be merged"):
        dt.merge(model)
    with pytest.raises(NotMergeableError):
        dt.unload(model, merge=True)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert all(host.merged == () for _, host in iter_hosts(model))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(NotMergeableError):
        combine_adapters(model, ["gate"], "combined", rank=1)


def test_toy_deltas_of_every_kind_save_and_load_through_the_public_api(tmp_path):
    model, x = _one_layer()
    reference = copy.deepcopy(model)
    _stack(model, output_method="toy_tanh_gate")
    dt.set_active(model, ["weight", "additive", "output"])
    expected = model(x).detach()
    loaded = copy.deepcopy(reference)
    for name in ("weight", "additive", "output"):
        dt.save_adapter(model, tmp_path / name, name=name)
        dt.load_adapter(loaded, tmp_path / name, name=name)
    dt.set_active(loaded, ["weight", "additive", "output"])
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


# --- fused == unfused, for every registered method that fuses with its base layer -------------------------------
FUSABLE_CASES = ("linear", "conv1d_hf", "conv")


def _fusing_methods() -> list[tuple[str, str]]:
    rows = []
    for entry in dt.list_methods():
        if not issubclass(entry.delta_cls, FusesWithBase):
            continue
        rows += [(entry.name, case) for case in FUSABLE_CASES if LAYER_CASES[case] in entry.delta_cls.layer_kinds]
    return rows


def test_the_fused_rows_are_not_vacuous():
    assert {method for method, _ in _fusing_methods()} >= {"lora"}


def _probe_input(layer) -> torch.Tensor:
    """A zero input the layer accepts: (1, in) for dense layers, (1, in, 5, ...) for convolutions."""
    return torch.zeros(1, layer.in_features, *([5] * layer.conv_dims), dtype=torch.float64)


def _forward_and_gradients(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("method,case", _fusing_methods())
def test_fused_equals_unfused_forward_and_gradients_in_float64(method, case):
    base, x = build(case)
    model = dt.adapt(base, dt.config_for(method, targets=None, layer_types=(case,)))
    _perturb(model, "default", 3)
    hosts = [host for _, host in iter_hosts(model)]
    assert all(host._fuse_first_additive or host._fuse_weight_delta for host in hosts)
    first = model.first.deltas["default"]
    fused_hosts = sum(host.deltas["default"].forward_with_base(_probe_input(host.layer), host.base_layer) is not None
                      for host in hosts)
    if not fused_hosts:
        pytest.skip(f"{method} fuses on none of these layers ({type(first).__name__} returned None)")
    fused = _forward_and_gradients(model, x)
    for host in hosts:
        # the host's unfused path: base_layer(x) + delta(x), or the weight path base_op(x, adapted_weight(W))
        host._fuse_first_additive = host._fuse_weight_delta = False
    unfused = _forward_and_gradients(model, x)
    torch.testing.assert_close(fused[0], unfused[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fused[1], unfused[1], rtol=0, atol=1e-12)
    assert fused[2].keys() == unfused[2].keys() and fused[2]
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], unfused[2][name], rtol=0, atol=1e-12, msg=name)

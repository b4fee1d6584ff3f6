"""A quantized frozen base (int8 per-row, NF4): deltas on it equal deltas on its dequantized float copy, the adapter
file holds the adapter alone, merge-back reports its error, and the refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltatune as dt
from contract.toy_models import build
from deltatune.core.host import AdaptedLayer
from deltatune.core.layers import LINEAR
from deltatune.errors import ConfigError, NotMergeableError, TrainingError, UnsupportedLayerError

pytestmark = pytest.mark.usefixtures("one_thread")
LINEAR_METHODS = [e.name for e in dt.list_methods() if LINEAR in e.delta_cls.layer_kinds]
SETTINGS = {"int8": dict(bits=8), "nf4": dict(bits=4), "nf4-no-dq": dict(bits=4, double_quant=False)}


def _quantized_and_float(setting: str = "nf4", seed: int = 0):
    """A float64 toy model quantized, its dequantized float copy (the reference), and an input."""
    model, x = build("linear", seed)
    dt.quantize_base(model, **SETTINGS[setting])
    reference = dt.dequantize_base(copy.deepcopy(model))
    return model, reference, x


def _perturb(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in delta.parameters():
                if parameter.is_floating_point():
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _adapt_both(model, reference, method: str):
    config = dt.config_for(method, targets=None, layer_types=(LINEAR,))
    torch.manual_seed(0)
    dt.adapt(model, config)
    torch.manual_seed(0)
    dt.adapt(reference, config)
    _perturb(model)
    _perturb(reference)


@pytest.mark.parametrize("setting", SETTINGS)
def test_the_quantized_base_computes_the_dequantized_linear_forward_and_backward(setting):
    model, reference, x = _quantized_and_float(setting)
    assert all(isinstance(m, dt.QuantizedLinear) for m in (model.first, model.second))
    assert type(reference.first) is nn.Linear
    inputs = x.clone().requires_grad_(True)
    torch.testing.assert_close(model(inputs), reference(x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: model.first(v), (inputs[:2],))


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_every_linear_method_on_a_4bit_base_equals_it_on_the_dequantized_float_base(method):
    model, reference, x = _quantized_and_float("nf4")
    _adapt_both(model, reference, method)
    expected = reference(x)
    output = model(x)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)
    output.square().sum().backward()
    expected.square().sum().backward()
    twins = dict(reference.named_parameters())  # the same names, and the float copy's weights besides
    for name, parameter in model.named_parameters():
        twin = twins[name]
        assert (parameter.grad is None) == (twin.grad is None), name
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, twin.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("setting", ["int8", "nf4"])
def test_lora_trains_on_the_quantized_base_and_only_the_adapter_changes(setting):
    model, _, x = _quantized_and_float(setting)
    dt.adapt(model, dt.LoRAConfig(rank=4, targets=["first", "second"]))
    codes = model.first.base_layer.weight_codes.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(5):
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert torch.equal(model.first.base_layer.weight_codes, codes)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n in dict(model.named_parameters()) if ".deltas." in n]


def test_backward_keeps_no_float_copy_of_the_weight():
    model, _, x = _quantized_and_float("nf4")
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"]))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        model(x).sum().backward()
    assert (24, 20) not in shapes and (18, 24) not in shapes, shapes


def test_base_memory_counts_codes_and_constants():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    for setting, expected_bits in (("int8", 8 + 32 / 256), ("nf4-no-dq", 4 + 32 / 64)):
        quantized = copy.deepcopy(model)
        memory = dt.quantize_base(quantized, **SETTINGS[setting])
        assert memory.parameters == 2 * 256 * 512 and memory.float32_bytes == 4 * memory.parameters
        assert memory.bfloat16_bytes == 2 * memory.parameters
        assert memory.stored_bytes == pytest.approx(memory.parameters * expected_bits / 8, rel=0.02)
        assert memory == dt.base_memory(quantized)
    memory = dt.quantize_base(copy.deepcopy(model), bits=4)
    # QLoRA §3: 4 bits + 8/64 + 32/(64·256) per weight with double quantization
    assert memory.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)


def test_the_adapter_file_holds_only_the_adapter_and_reloads_on_a_fresh_quantized_base(tmp_path):
    model, _, x = _quantized_and_float("nf4")
    fresh = copy.deepcopy(model)
    dt.adapt(model, dt.LoRAConfig(rank=4, targets=["first", "second"]))
    _perturb(model)
    expected = model(x).detach()
    dt.save_adapter(model, tmp_path / "adapter")
    keys = []
    for file in (tmp_path / "adapter").glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys += list(handle.keys())
    assert keys and all(".lora_" in key for key in keys), keys
    loaded = dt.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_a_quantized_model_state_dict_round_trips_into_another_quantized_model():
    model, _, x = _quantized_and_float("nf4", seed=0)
    other, _, _ = _quantized_and_float("nf4", seed=3)
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    assert "first.weight_codes" in model.state_dict() and "first.weight" not in model.state_dict()


@pytest.mark.parametrize("setting", ["int8", "nf4"])
def test_merge_back_requantizes_and_reports_the_error_against_the_float_merge(setting):
    model, reference, x = _quantized_and_float(setting)
    _adapt_both(model, reference, "lora")
    base_first = model.first.base_layer.dequantized_weight(torch.float64)
    with pytest.raises(NotMergeableError, match="merge_quantized"):
        dt.merge(model)
    float_merged = dt.unload(reference, merge=True)  # the exact float merge on the dequantized base
    merged_weight = float_merged.first.weight.detach()
    report = dt.merge_quantized(model)
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert isinstance(model.first, dt.QuantizedLinear)
    error = model.first.dequantized_weight(torch.float64) - merged_weight
    layer = {entry.path: entry for entry in report.layers}["first"]
    assert layer.max_abs == pytest.approx(float(error.abs().max()), rel=1e-9)
    assert layer.mean_abs == pytest.approx(float(error.abs().mean()), rel=1e-9)
    assert layer.relative_frobenius == pytest.approx(float(error.norm() / merged_weight.norm()), rel=1e-9)
    assert 0 < report.relative_frobenius < (0.02 if setting == "int8" else 0.2)
    assert report.max_abs == max(entry.max_abs for entry in report.layers)
    stored_change = model.first.dequantized_weight(torch.float64) - base_first
    change = merged_weight - base_first
    assert layer.delta_kept == pytest.approx(float((stored_change * change).sum() / change.square().sum()), rel=1e-9)
    # the requantized model computes the float merge up to that error
    torch.testing.assert_close(model(x), float_merged(x), rtol=0, atol=0.5 if setting == "nf4" else 0.05)


def test_a_delta_far_below_the_quantization_step_is_rounded_away_and_the_report_says_so():
    model, _, _ = _quantized_and_float("nf4")
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"], init="random"))
    with torch.no_grad():
        model.first.deltas["default"].lora_B.mul_(1e-6)
    report = dt.merge_quantized(model)
    assert report.delta_kept < 0.05 and report.relative_frobenius >= report.delta_relative_frobenius * 0.9


@pytest.mark.parametrize("bits", [8, 4])
def test_requantizing_from_the_original_weights_carries_a_small_delta_through(bits):
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(256, 256)).double()
    weights = {key: value.clone() for key, value in original.state_dict().items()}
    runs = {}
    for with_original in (False, True):
        model = copy.deepcopy(original)
        dt.quantize_base(model, bits=bits)
        torch.manual_seed(1)
        dt.adapt(model, dt.LoRAConfig(rank=4, targets=["0"], init="random"))
        with torch.no_grad():  # a ΔW far below half a quantization step
            model[0].deltas["default"].lora_B.mul_(1e-3)
        runs[with_original] = dt.merge_quantized(model, weights if with_original else None)
    assert runs[False].delta_kept < 0.2
    assert 0.8 < runs[True].delta_kept < 1.2  # rounding W_original + ΔW is unbiased: ΔW survives on average
    with pytest.raises(NotMergeableError, match="shape"):
        model = copy.deepcopy(original)
        dt.quantize_base(model, bits=bits)
        dt.adapt(model, dt.LoRAConfig(rank=4, targets=["0"], init="random"))
        dt.merge_quantized(model, {"0.weight": torch.zeros(3, 3)})


def test_merge_quantized_refuses_a_model_without_an_adapter_on_a_quantized_layer():
    model, _ = build("linear")
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"]))
    with pytest.raises(NotMergeableError, match="no active adapter on a quantized layer"):
        dt.merge_quantized(model)


def test_compute_dtype_and_model_casts_keep_the_constants_in_float32():
    model = nn.Sequential(nn.Linear(64, 32))
    dt.quantize_base(model, bits=4, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    assert model(x).dtype == torch.float32  # computed in bfloat16, returned in the input's dtype
    assert model[0].weight.dtype == torch.float32  # deltas follow the model's dtype, not the compute dtype
    model.to(torch.bfloat16)
    layer = model[0]
    assert layer.absmax_scale.dtype == torch.float32 and layer.weight_codes.dtype == torch.uint8
    assert model(x.bfloat16()).dtype == torch.bfloat16


# --- refusals ------------------------------------------------------------------------------------------------
def test_bits_other_than_4_or_8_are_refused():
    with pytest.raises(ConfigError, match="bits=3"):
        dt.quantize_base(build("linear")[0], bits=3)


def test_a_non_linear_target_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Embedding(5, 4))
    with pytest.raises(UnsupportedLayerError, match="1 is a LayerNorm"):
        dt.quantize_base(model, targets=["0", "1"])
    assert type(model[0]) is nn.Linear  # nothing changed


def test_training_the_quantized_weight_is_refused():
    model, _, _ = _quantized_and_float("nf4")
    with pytest.raises(TrainingError, match="stored quantized and frozen"):
        model.first.requires_grad_(True)
    with pytest.raises(TrainingError, match="stored quantized and frozen"):
        model.first.weight = nn.Parameter(torch.zeros(24, 20, dtype=torch.float64))
    with pytest.raises(TrainingError, match="extra_trainable"):
        dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"], extra_trainable=["second"]))


def test_quantizing_an_adapted_model_or_a_tied_weight_is_refused():
    model, _ = build("linear")
    tied = copy.deepcopy(model)
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"]))
    with pytest.raises(ConfigError, match="before deltatune.adapt"):
        dt.quantize_base(model)
    tied.second.weight = nn.Parameter(torch.zeros(18, 24, dtype=torch.float64))
    tied.extra = nn.Linear(24, 18).double()
    tied.extra.weight = tied.second.weight
    with pytest.raises(ConfigError, match="shared"):
        dt.quantize_base(tied)


def test_a_mixed_adapter_batch_on_a_quantized_base_equals_each_sub_batch_alone():
    model, _, x = _quantized_and_float("int8")
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first", "second"], init="random"), name)
    names = ["a", "b", "base", "a", "b"]
    with dt.route(model, adapter_names=names):
        mixed = model(x)
    for row, name in enumerate(names):
        if name == "base":
            with dt.disabled(model):
                alone = model(x[row:row + 1])
        else:
            dt.set_active(model, [name])
            alone = model(x[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-12, atol=1e-12)

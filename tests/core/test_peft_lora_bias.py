"""LoRA's bias term (peft's lora_bias) through the peft format, both directions, against the real peft package;
so a combined BitFit adapter (`combine_adapters`) exports to peft too."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from contract.toy_models import build
from deltatune.errors import ConfigError
from deltatune.merging.adapters import combine_adapters

peft = pytest.importorskip("peft")


def _randomize(model, names=("lora_B.default.bias",), seed=0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(name.endswith(n) for n in names):
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def test_a_peft_lora_bias_folder_loads_with_equal_outputs(tmp_path):
    base, x = build("linear")
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["first", "second"], lora_bias=True,
                             init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _randomize(theirs)
    expected = theirs(x).detach()
    assert not torch.allclose(expected, peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["first", "second"], init_lora_weights=False))(x))  # the bias matters
    theirs.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert next(delta for _, _, delta in dt.iter_deltas(ours)).config.bias is True
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-12)


def test_a_lora_with_a_bias_term_exports_to_peft_and_back_with_equal_outputs(tmp_path):
    base, x = build("conv")
    ours = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, alpha=4.0, bias=True, init="random", targets=None,
                                                        layer_types=("conv",)))
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(ours):
            delta.lora_bias.normal_()
    expected = ours(x).detach()
    dt.save_adapter(ours, tmp_path / "export", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "export")
    torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-12)
    back = dt.load_adapter(copy.deepcopy(base), tmp_path / "export")
    torch.testing.assert_close(back(x), expected, rtol=0, atol=1e-12)


def test_a_combined_bitfit_adapter_runs_in_peft_as_it_ran_in_deltatune(tmp_path):
    base, x = build("linear")
    model = dt.adapt(copy.deepcopy(base), dt.BitFitConfig(targets=["first", "second"]), name="bits")
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            delta.bias_delta.normal_()
    expected = model(x).detach()
    combine_adapters(model, ["bits"], "combined", rank=1)
    dt.save_adapter(model, tmp_path / "combined", name="combined", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "combined")
    torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-10)


def test_an_embedding_lora_with_a_bias_term_refuses_the_peft_format_by_name(tmp_path):
    base, _ = build("embedding")
    model = dt.adapt(base, dt.LoRAConfig(rank=2, bias=True, targets=["first"]))
    with pytest.raises(ConfigError, match="bias=True is invalid.*peft has no embedding lora_bias.*format='deltatune'"):
        dt.save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


def test_inspect_groups_a_peft_bias_term_under_its_module(tmp_path):
    from deltatune.inspect import summarize_adapter

    base, _ = build("linear")
    model = dt.adapt(base, dt.LoRAConfig(rank=2, bias=True, targets=["first"], extra_trainable=["second"]))
    dt.save_adapter(model, tmp_path / "peft", format="peft")
    summary = summarize_adapter(tmp_path / "peft")
    assert summary.modules == {"first": {"lora_A": (2, 20), "lora_B": (24, 2), "lora_B.bias": (24,)},
                               "second": {"weight": (18, 24), "bias": (18,)}}
    assert summary.parameters == 2 * 20 + 24 * 2 + 24 + 18 * 24 + 18

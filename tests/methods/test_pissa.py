"""PiSSA and OLoRA: the residual + s·BA is W0 at init (float64), the factors are the top-r SVD / the QR's first r
components; peft folders (unconverted and converted) load to peft's outputs; the conversion to a plain rank-2r LoRA
keeps the outputs; the randomized SVD is seeded; what cannot be rebuilt is refused by name."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.methods.olora import OLoRAConfig
from deltatune.methods.pissa import PiSSAConfig, to_plain_lora


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 8))


def _train_a_little(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in (delta.lora_A, delta.lora_B):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


@pytest.mark.parametrize("config", [PiSSAConfig(rank=3, alpha=6, targets=["0", "2"]),
                                    OLoRAConfig(rank=3, alpha=6, targets=["0", "2"])])
def test_at_init_the_residual_plus_the_adapter_is_the_base_in_float64(config):
    base = _net().double()
    model = dt.adapt(copy.deepcopy(base), config)
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-13)
    delta = model[0].deltas["default"]
    weight = base[0].weight.detach()
    principal = config.scale * delta.lora_B.detach() @ delta.lora_A.detach()
    if isinstance(config, OLoRAConfig):
        q, r = torch.linalg.qr(weight)
        expected = config.scale * q[:, :3] @ r[:3]
    else:
        u, s, vh = torch.linalg.svd(weight)
        expected = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(principal, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(model[0].weight, base[0].weight)  # the checkpoint's weights are never rewritten


def test_the_randomized_svd_is_seeded_and_close_to_the_full_one():
    def factors(seed):
        model = dt.adapt(_net().double(), PiSSAConfig(rank=2, targets=["0"], svd_iterations=4, seed=seed))
        return model[0].deltas["default"].lora_A.detach().clone()

    torch.manual_seed(5)
    first = factors(0)
    torch.manual_seed(6)  # the global generator does not matter: the config's seed does
    assert torch.equal(first, factors(0)) and not torch.equal(first, factors(1))
    model = dt.adapt(_net().double(), PiSSAConfig(rank=2, targets=["0"], svd_iterations=8))
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), _net().double()(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peft_folder_unconverted_and_converted_loads_to_peft_outputs(tmp_path, init):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _net()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"],
                                                                 init_lora_weights=init))
    peft_model.save_pretrained(tmp_path / "initial")  # the adapter at init, for peft's conversion
    _peft_train_a_little(peft_model)
    x = torch.randn(5, 12)
    expected = peft_model(x).detach()
    peft_model.save_pretrained(tmp_path / "trained")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "trained")
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "trained")  # peft rebuilds the residual too
    torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-6)
    fresh_initial = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"],
                                                                   init_lora_weights=init))
    fresh_initial.peft_config["default"].init_lora_weights = True
    fresh_initial.save_pretrained(tmp_path / "init_plain")
    peft_model.save_pretrained(tmp_path / "converted",
                               path_initial_model_for_weight_conversion=str(tmp_path / "init_plain"))
    converted = dt.load_adapter(copy.deepcopy(base), tmp_path / "converted")
    assert type(next(dt.iter_deltas(converted))[2]).__name__ == "LoRADelta"
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)


def _peft_train_a_little(peft_model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("config_cls", [PiSSAConfig, OLoRAConfig])
def test_conversion_to_a_plain_lora_keeps_the_outputs_on_the_original_base(tmp_path, config_cls):
    from peft import PeftModel

    base = _net().double()
    model = dt.adapt(copy.deepcopy(base), config_cls(rank=3, alpha=6, targets=["0", "2"]))
    _train_a_little(model)
    x = torch.randn(4, 12, dtype=torch.float64)
    expected = model(x).detach()
    to_plain_lora(model)
    delta = model[0].deltas["default"]
    assert type(delta).__name__ == "LoRADelta" and delta.rank == 6 and delta.config.alpha == 12
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    dt.save_adapter(model, tmp_path / "plain", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base).float(), tmp_path / "plain")
    torch.testing.assert_close(theirs(x.float()).double(), expected, rtol=1e-5, atol=1e-5)


def test_our_pissa_folder_loads_in_peft_to_our_outputs(tmp_path):
    from peft import PeftModel

    base = _net()
    model = dt.adapt(copy.deepcopy(base), PiSSAConfig(rank=3, alpha=6, targets=["0", "2"]))
    _train_a_little(model)
    x = torch.randn(4, 12)
    dt.save_adapter(model, tmp_path / "ours", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-6)


def test_what_cannot_be_rebuilt_is_refused_by_name(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    get_peft_model(_net(), LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa_niter_2")).save_pretrained(
        tmp_path / "niter")
    with pytest.raises(ConfigError, match="randomized"):
        dt.load_adapter(_net(), tmp_path / "niter")
    model = dt.adapt(_net(), PiSSAConfig(rank=2, targets=["0"], svd_iterations=2))
    with pytest.raises(ConfigError, match="svd_iterations"):
        dt.save_adapter(model, tmp_path / "out", format="peft")
    with pytest.raises(ConfigError, match="init"):
        PiSSAConfig(init="gaussian")
    with pytest.raises(ConfigError, match="svd_iterations"):
        OLoRAConfig(svd_iterations=2)

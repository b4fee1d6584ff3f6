"""DoRA against the paper's formula (float64) and against peft itself: folders with use_dora=True load to peft's
outputs (dropout included, on Linear, Conv2d and Embedding), deltatune writes folders peft loads to the same
outputs; the norm is detached; merge is W' exactly and unmerge restores W0."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.methods.dora import DoRAConfig


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, ids):
        hidden = self.lin(self.emb(ids))  # (batch, 9, 5)
        return self.conv(hidden.transpose(1, 2).reshape(-1, 5, 3, 3))


def _randomized(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in delta.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _reference_weight(delta, weight: torch.Tensor) -> torch.Tensor:
    """W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_c in float64, from the paper's Eq. 5 on the matrix view."""
    layer = delta.layer
    matrix = layer.to_matrix(weight) + delta.config.scale * (
        delta.lora_B.detach().reshape(layer.out_features, -1) @ delta.lora_A.detach().reshape(delta.config.rank, -1))
    magnitude = delta.lora_magnitude.detach().reshape(-1)
    return layer.from_matrix(magnitude[:, None] * matrix / matrix.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("layer", [nn.Linear(7, 5), Conv1D(5, 7), nn.Conv2d(3, 4, 3), nn.Embedding(9, 5)])
def test_forward_and_merge_are_the_papers_weight_exactly(layer):
    torch.manual_seed(0)
    model = nn.Sequential(layer).double()
    base = copy.deepcopy(model)
    dt.adapt(model, DoRAConfig(rank=2, alpha=3, targets=["0"]))
    torch.testing.assert_close(model[0].deltas["default"].lora_magnitude.reshape(-1),
                               layer.weight.detach().reshape(layer.weight.shape[0], -1).norm(dim=1)
                               if not isinstance(layer, (Conv1D, nn.Embedding)) else layer.weight.norm(dim=0))
    _randomized(model)
    delta = model[0].deltas["default"]
    expected_weight = _reference_weight(delta, base[0].weight.detach())
    x = {nn.Linear: torch.randn(4, 7), Conv1D: torch.randn(4, 7), nn.Conv2d: torch.randn(2, 3, 5, 5)}.get(
        type(layer), torch.randint(0, 9, (3, 4)))
    x = x.double() if x.is_floating_point() else x
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain[0].weight.copy_(expected_weight)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    dt.merge(model)
    torch.testing.assert_close(model[0].weight, expected_weight, rtol=1e-13, atol=1e-14)
    dt.unmerge(model)
    torch.testing.assert_close(model[0].weight, base[0].weight, rtol=1e-13, atol=1e-14)


def test_the_norm_gets_no_gradient():
    """With the norm detached, ∂L/∂A and ∂L/∂B are those of g ⊙ (W + sBA) with g a constant (paper §4.3)."""
    torch.manual_seed(1)
    model = dt.adapt(nn.Sequential(nn.Linear(6, 4)).double(), DoRAConfig(rank=2, targets=["0"]))
    _randomized(model)
    delta = model[0].deltas["default"]
    x = torch.randn(5, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    weight = model[0].base_layer.weight.detach()
    A, B, m = (t.detach().clone().requires_grad_() for t in (delta.lora_A, delta.lora_B, delta.lora_magnitude))
    norm = (weight + delta.config.scale * B.detach() @ A.detach()).norm(dim=1)
    y = torch.nn.functional.linear(x, (m / norm)[:, None] * (weight + delta.config.scale * B @ A), model[0].bias)
    y.square().sum().backward()
    for mine, reference in ((delta.lora_A, A), (delta.lora_B, B), (delta.lora_magnitude, m)):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-12, atol=1e-12)


def _peft_pair(dropout: float, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = Mixed()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=5, lora_dropout=dropout, target_modules=["emb", "lin", "conv"], use_dora=True))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return base, peft_model


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_peft_dora_folder_loads_to_peft_outputs_in_eval_and_in_training(tmp_path, dropout):
    base, peft_model = _peft_pair(dropout)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "peft", trainable=True)
    assert isinstance(dt.adapter_config(ours) if hasattr(dt, "adapter_config") else
                      next(iter(dt.iter_deltas(ours)))[2].config, DoRAConfig)
    ids = torch.randint(0, 11, (2, 9))
    peft_model.eval(), ours.eval()
    torch.testing.assert_close(ours(ids), peft_model(ids), rtol=1e-5, atol=1e-6)
    peft_model.train(), ours.train()
    torch.manual_seed(5)
    theirs = peft_model(ids)
    torch.manual_seed(5)
    torch.testing.assert_close(ours(ids), theirs, rtol=1e-5, atol=1e-6)


def test_deltatune_writes_a_dora_folder_peft_loads_to_the_same_outputs(tmp_path):
    from peft import PeftModel

    torch.manual_seed(3)
    base = Mixed()
    ours = dt.adapt(copy.deepcopy(base), DoRAConfig(rank=2, alpha=4, targets=["emb", "lin", "conv"]))
    _randomized(ours)
    dt.save_adapter(ours, tmp_path / "out", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    ids = torch.randint(0, 11, (2, 9))
    torch.testing.assert_close(theirs(ids), ours.eval()(ids), rtol=1e-5, atol=1e-6)
    theirs.merge_and_unload()
    torch.testing.assert_close(theirs(ids), ours(ids), rtol=1e-5, atol=1e-6)


def test_bias_is_refused_by_name():
    with pytest.raises(ConfigError, match="bias"):
        DoRAConfig(bias=True)

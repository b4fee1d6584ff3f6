"""A host inside a hosted block (LoRA on a projection of a block that IAA or VPT wraps): the inner layer keeps
its plain path for targeting, adapter keys and unload, in either order of adaptation; the model's own state
dict loads back strictly (checkpoints and resumes go through it)."""
from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.host import AdaptedLayer


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.proj(hidden_states))


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            h = block(h)
        return h


def _perturbed(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in delta.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def _block_config():
    return dt.config_for("iaa", inside=r"never", blocks="layers", bottleneck_size=2)


def _lora_config():
    return dt.config_for("lora", targets=("proj",), rank=2)


@pytest.mark.parametrize("block_first", [True, False])
def test_a_layer_inside_a_hosted_block_keeps_its_plain_path(block_first):
    torch.manual_seed(0)
    reference = _Stack().double()
    model = copy.deepcopy(reference)
    first, second = (("blocks", _block_config()), ("lora", _lora_config()))[:: 1 if block_first else -1]
    dt.adapt(model, first[1], name=first[0])
    dt.adapt(model, second[1], name=second[0])
    dt.set_active(model, ["blocks", "lora"])
    _perturbed(model)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = model(x)

    assert sorted(p for p, _, _ in dt.iter_deltas(model)) == ["layers.0", "layers.0.proj", "layers.1",
                                                             "layers.1.proj"]
    assert all(".base_layer" not in key for key in dt.adapter_state_dict(model, "lora"))
    model.load_state_dict(model.state_dict(), strict=True)  # a checkpoint of the whole model loads back

    with tempfile.TemporaryDirectory() as folder:
        loaded = copy.deepcopy(reference)
        for name in (first[0], second[0]):
            dt.save_adapter(model, f"{folder}/{name}", name=name)
            dt.load_adapter(loaded, f"{folder}/{name}", name=name)
    dt.set_active(loaded, ["blocks", "lora"])
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    plain = dt.unload(copy.deepcopy(model), merge=False)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(plain(x), reference(x), rtol=0, atol=0)
    dt.delete_adapter(model, "blocks")
    assert [p for p, _, _ in dt.iter_deltas(model)] == ["layers.0.proj", "layers.1.proj"]
    assert not torch.equal(model(x), expected)  # only LoRA is left active


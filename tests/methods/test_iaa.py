"""IAA connected modules (our reading): inside adapters after each FFN projection, aside adapters around each
block. Forward against a float64 hand-written reference; identity at init; the pathway (an inside module keeps
its gradient when every later frozen block is cut, the scattered variant loses it); targets derived from
`connected`; save → load identical on MiniLM; bad configs and block outputs refused by name."""
from __future__ import annotations

import copy
import functools
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, NotMergeableError
from deltatune.methods.iaa import IAAConfig


class _Output(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense(h)


class _Block(nn.Module):
    """h -> gate · h + tanh(output.dense(h)): `gate = 0` cuts the residual, so only the block's weights pass."""

    def __init__(self, width: int, gate: float = 1.0) -> None:
        super().__init__()
        self.output = _Output(width)
        self.gate = gate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.gate * hidden_states + torch.tanh(self.output(hidden_states))


class _Encoder(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3, gate: float = 1.0) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Block(width, gate) for _ in range(depth))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            h = block(h)
        return h


def _encoder(seed: int = 0, **kwargs) -> _Encoder:
    torch.manual_seed(seed)
    return _Encoder(**kwargs).double()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _randomize(model: nn.Module, seed: int = 2, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in delta.parameters():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _bottleneck(delta, h: torch.Tensor) -> torch.Tensor:
    down, up = delta.adapter_down, delta.adapter_up
    return delta.config.scaling * (F.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def test_forward_is_inside_after_the_projection_and_aside_around_the_block():
    model, reference = _encoder(), _encoder()
    dt.adapt(model, IAAConfig(bottleneck_size=3, aside_bottleneck_size=2, scaling=0.8))
    _randomize(model)
    h = _x()
    for index, block in enumerate(reference.layer):
        inside = model.layer[index].output.dense.deltas["default"]
        aside = model.layer[index].deltas["default"]
        projected = block.output.dense(h)
        h_next = block.gate * h + torch.tanh(projected + _bottleneck(inside, projected))
        h = h_next + _bottleneck(aside, h)
    torch.testing.assert_close(model(_x()), h, rtol=1e-12, atol=1e-12)
    assert model.layer[0].deltas["default"].adapter_down.out_features == 2
    assert model.layer[0].output.dense.deltas["default"].adapter_down.out_features == 3


def test_unchanged_at_init():
    model, reference = _encoder(), _encoder()
    dt.adapt(model, IAAConfig(bottleneck_size=4))
    torch.testing.assert_close(model(_x()), reference(_x()), rtol=0, atol=0)


def _inside_gradient(connected: bool) -> float:
    """|grad| of the first inside module when blocks 1, 2 have no residual and zero projection weights: the
    frozen path from block 0 to the output carries nothing."""
    model = _encoder(gate=0.0)
    with torch.no_grad():
        for block in model.layer[1:]:
            block.output.dense.weight.zero_()
    dt.adapt(model, IAAConfig(bottleneck_size=3, connected=connected))
    _randomize(model)
    model(_x()).square().sum().backward()
    return float(model.layer[0].output.dense.deltas["default"].adapter_down.weight.grad.abs().sum())


def test_the_aside_modules_give_every_inside_module_a_trainable_path_to_the_output():
    assert _inside_gradient(connected=False) == 0.0  # scattered: the cut frozen blocks stop the gradient
    assert _inside_gradient(connected=True) > 1e-6  # connected: it flows through the aside chain


def test_targets_follow_connected_and_blocks():
    connected, scattered = IAAConfig(), IAAConfig(connected=False)
    paths = [p for p, _, _ in dt.iter_deltas(dt.adapt(_encoder(), connected))]
    assert paths == ["layer.0", "layer.0.output.dense", "layer.1", "layer.1.output.dense", "layer.2",
                     "layer.2.output.dense"]
    assert [p for p, _, _ in dt.iter_deltas(dt.adapt(_encoder(), scattered))] == [p for p in paths if "dense" in p]
    assert IAAConfig(blocks="layers").blocks == ("layers",)


@functools.cache
def _minilm() -> nn.Module:
    from deltatune.data.models import build_minilm_classifier

    torch.manual_seed(0)
    return build_minilm_classifier(3).double().eval()


def test_minilm_saves_loads_and_refuses_to_merge():
    model = copy.deepcopy(_minilm())
    reference = copy.deepcopy(model)
    dt.adapt(model, IAAConfig(bottleneck_size=4))
    _randomize(model, scale=0.05)
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    expected = model(ids, mask)
    assert (expected - reference(ids, mask)).abs().max() > 1e-4
    with tempfile.TemporaryDirectory() as folder:
        dt.save_adapter(model, folder)
        loaded = dt.load_adapter(copy.deepcopy(reference), folder)
    torch.testing.assert_close(loaded(ids, mask), expected, rtol=0, atol=0)
    with pytest.raises(NotMergeableError, match="non-linear"):
        dt.merge(model)
    torch.testing.assert_close(model(ids, mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize("field,value", [("blocks", ()), ("blocks", ("",)), ("aside_bottleneck_size", 0),
                                         ("inside", "")])
def test_bad_configs_are_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        IAAConfig(**{field: value})


class _DictBlock(_Block):
    def forward(self, hidden_states: torch.Tensor) -> dict:
        return {"hidden": super().forward(hidden_states)}


def test_a_block_that_returns_no_hidden_states_is_refused_by_name():
    model = _encoder()
    model.layer[0] = _DictBlock(8).double()
    model.layer = model.layer[:1]
    dt.adapt(model, IAAConfig(bottleneck_size=2))
    with pytest.raises(ConfigError, match="returned dict"):
        model.layer[0](_x())

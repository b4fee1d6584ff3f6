"""Training several adapters at once with per-sample routing equals training them one by one."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from contract.toy_models import build
from deltatune.errors import ConfigError
from deltatune.train.multi_adapter import MultiAdapterTraining

CONFIGS = {
    "a": dt.LoRAConfig(rank=4, targets=None, init="random"),
    "b": dt.LoRAConfig(rank=2, alpha=4, targets=None, init="random"),
    "c": dt.config_for("ssf", targets=None),
}
STEPS = 4


def _model():
    base, _ = build("linear")
    model = copy.deepcopy(base)
    for name, config in CONFIGS.items():
        torch.manual_seed(len(name) + ord(name))
        dt.adapt(model, config, name)
    return model


def _batches():
    generator = torch.Generator().manual_seed(7)
    names = ["a", "b", "c", "base", "a", "c", "b", "a"]
    return [(torch.randn(8, 20, generator=generator, dtype=torch.float64),
              torch.randn(8, 18, generator=generator, dtype=torch.float64),
              names[step:] + names[:step]) for step in range(STEPS)]


def _adam(parameters):
    return torch.optim.Adam(parameters, lr=1e-2)


def _trained_together(model):
    training = MultiAdapterTraining(model, list(CONFIGS), _adam)
    for x, y, names in _batches():
        training.step(names, lambda x=x, y=y: (model(x) - y).square().mean(-1))
    return training


def _trained_alone(model, name):
    dt.set_active(model, [name])
    dt.set_trainable(model, name)
    optimizer = _adam([p for p in model.parameters() if p.requires_grad])
    for x, y, names in _batches():
        rows = [i for i, n in enumerate(names) if n == name]
        loss = (model(x[rows]) - y[rows]).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_training_three_adapters_at_once_equals_training_each_alone(tmp_path):
    model = _model()
    folders = _trained_together(model).save(tmp_path)
    for name in CONFIGS:
        alone = _model()
        _trained_alone(alone, name)
        together, expected = dt.adapter_state_dict(model, name), dt.adapter_state_dict(alone, name)
        assert together.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(together[key], expected[key], rtol=1e-10, atol=1e-12)
            assert not torch.equal(expected[key], dt.adapter_state_dict(_model(), name)[key]), f"{key} never moved"
        x = _batches()[0][0]
        loaded = dt.load_adapter(build("linear")[0], folders[name])
        torch.testing.assert_close(loaded(x), alone.eval()(x), rtol=1e-10, atol=1e-12)


def test_each_adapter_keeps_its_own_optimizer_state():
    training = _trained_together(_model())
    states = {name: training.optimizers[name].state_dict()["state"] for name in CONFIGS}
    assert all(states.values()) and all(state[0]["step"] == STEPS for state in states.values())


def test_adapters_with_shared_extra_modules_and_unknown_names_are_refused():
    model = _model()
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"], extra_trainable=("second",)), "headed")
    with pytest.raises(ConfigError, match="trains extra modules"):
        MultiAdapterTraining(model, ["a", "headed"], _adam)
    training = MultiAdapterTraining(model, ["a"], _adam)
    with pytest.raises(ConfigError, match="'b' is not trained here"):
        training.step(["a", "b"], lambda: model(torch.zeros(2, 20, dtype=torch.float64)).sum(-1))

"""Adapting or loading keeps the model's train/eval mode: new deltas never switch dropout back on."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt


def _model(training: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16))
    return model.train(training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("method", ["lora", "spt", "ssf"])
def test_adapt_and_load_keep_the_models_mode(method, training, tmp_path):
    config = dt.config_for(method, targets=["0", "2"], **({"dropout": 0.5} if method == "lora" else {}))
    batch = {"input": torch.randn(4, 16), "labels": torch.randn(4, 16)}
    config = config.plan(_model(training), iter([batch]), loss_fn=lambda out, labels: (out - labels).square().mean())
    model = dt.adapt(_model(training), config)
    assert {m.training for m in model.modules()} == {training}
    dt.save_adapter(model, tmp_path / "a")
    loaded = dt.load_adapter(_model(training), tmp_path / "a")
    assert {m.training for m in loaded.modules()} == {training}

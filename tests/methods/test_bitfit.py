"""BitFit: only biases change, against float64 references; merging writes the bias."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.errors import UnsupportedLayerError
from deltatune.methods.bitfit import BitFitConfig


def test_linear_and_conv_outputs_shift_by_the_bias_delta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 6)).double()
    reference = copy.deepcopy(model)
    dt.adapt(model, BitFitConfig())
    deltas = {path: d for path, _, d in dt.iter_deltas(model)}
    assert set(deltas) == {"0", "2"}
    with torch.no_grad():
        for d in deltas.values():
            d.bias_delta.normal_()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    hidden = F.conv2d(x, reference[0].weight, reference[0].bias + deltas["0"].bias_delta).flatten(1)
    expected = F.linear(hidden, reference[2].weight, reference[2].bias + deltas["2"].bias_delta)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_only_biases_train_and_merge_changes_only_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    reference = copy.deepcopy(model)
    dt.adapt(model, BitFitConfig())
    assert dt.trainable_parameters(model).trainable == 6 + 3
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 8, dtype=torch.float64)
    model(x).square().sum().backward()
    optimizer.step()
    expected = model(x).detach()
    plain = dt.unload(model, merge=True)
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12)
    for (name, new), old in zip(plain.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(new, old) == name.endswith("weight")


def test_a_layer_without_bias_is_refused_and_the_model_is_unchanged():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2, bias=False))
    with pytest.raises(UnsupportedLayerError, match="'1'.*no bias"):
        dt.adapt(model, BitFitConfig())
    assert all(type(m) in (nn.Sequential, nn.Linear) for m in model.modules())

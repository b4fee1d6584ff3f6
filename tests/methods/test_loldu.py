"""LoLDU: the factors are W0's LU (P as an index vector, checked against torch's dense P), the update is
σ P L_r diag(z) U_r − σ0 P L_r diag(D_r) U_r exactly, near-zero pivots are refused or floored by name, and the
trainable count is the paper's r + 1."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError, UnsupportedLayerError
from deltatune.methods.loldu import LoLDUConfig, ldu_factors


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6)])
def test_factors_are_the_pivoted_lu_with_p_as_an_index_vector(shape):
    weight = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows, lower, pivots, upper = ldu_factors(weight)
    dense_p, dense_l, dense_u = torch.linalg.lu(weight)
    assert rows.dtype == torch.int64 and rows.shape == (shape[0],)
    assert torch.equal(dense_p.argmax(1), rows)
    torch.testing.assert_close(lower, dense_l, rtol=0, atol=1e-15)
    torch.testing.assert_close(pivots, dense_u.diagonal(), rtol=0, atol=1e-15)
    unit_upper = upper / pivots[:, None]
    torch.testing.assert_close((lower * pivots) @ unit_upper, (lower @ upper), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close((lower @ upper)[rows], weight, rtol=0, atol=1e-14)


def _model(layer=nn.Linear):
    torch.manual_seed(0)
    return nn.Sequential(layer(6, 9), nn.Tanh(), layer(9, 4)).double() if layer is nn.Linear else \
        nn.Sequential(Conv1D(9, 6), nn.Tanh(), Conv1D(4, 9)).double()


@pytest.mark.parametrize("layer", [nn.Linear, Conv1D])
def test_the_update_is_the_papers_ldu_formula(layer):
    model = _model(layer)
    base = copy.deepcopy(model)
    dt.adapt(model, LoLDUConfig(rank=3, alpha=6.0, targets=None))
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # σ z − σ0 D_r is exactly 0 at init
    delta = dict((path, d) for path, _, d in dt.iter_deltas(model))["0"]
    with torch.no_grad():
        delta.loldu_diagonal.add_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
        delta.loldu_scale.fill_(1.7)
    weight = base[0].weight.detach() if layer is nn.Linear else base[0].weight.detach().T
    p, lower, upper = torch.linalg.lu(weight)
    d = upper.diagonal()[:3]
    unit = upper[:3] / d[:, None]
    expected_w = weight + 1.7 * p @ lower[:, :3] @ torch.diag(delta.loldu_diagonal.detach()) @ unit \
        - 2.0 * p @ lower[:, :3] @ torch.diag(d) @ unit  # σ0 = alpha / r = 2
    hidden = torch.tanh(x @ expected_w.T + base[0].bias.detach())
    torch.testing.assert_close(model(x), base[2](hidden), rtol=1e-12, atol=1e-12)


def test_trains_r_plus_one_values_by_default_and_r_without_the_scale():
    model = dt.adapt(_model(), LoLDUConfig(rank=2, targets=None))
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    assert sum(trainable) == 2 * (2 + 1)
    model = dt.adapt(_model(), LoLDUConfig(rank=2, targets=None, train_scale=False))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2


def test_full_rank_by_default_with_sigma_one():
    model = dt.adapt(_model(), LoLDUConfig(targets=None))
    deltas = {path: d for path, _, d in dt.iter_deltas(model)}
    assert deltas["0"].rank == 6 and deltas["2"].rank == 4
    assert float(deltas["0"].loldu_scale.detach()) == 1.0


def test_near_zero_pivots_are_refused_by_name_or_floored_exactly():
    model = nn.Sequential(nn.Linear(4, 4)).double()
    with torch.no_grad():  # rank 2: LU's third pivot is (numerically) zero
        model[0].weight.copy_(torch.randn(4, 2, dtype=torch.float64) @ torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="pivot 2 .*near_zero_pivots='floor'"):
        dt.adapt(copy.deepcopy(model), LoLDUConfig(targets=None))
    dt.adapt(copy.deepcopy(model), LoLDUConfig(targets=None, rank=2))  # the first two pivots are fine
    floored = dt.adapt(copy.deepcopy(model), LoLDUConfig(targets=None, near_zero_pivots="floor"))
    delta = next(d for _, _, d in dt.iter_deltas(floored))
    assert torch.isfinite(delta.loldu_upper).all() and delta.loldu_upper.abs().max() < 1e3
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(floored(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        delta.loldu_diagonal.mul_(1.1)
    dt.merge(floored)
    assert torch.isfinite(floored[0].weight).all()


def test_ablation_inits_change_the_output_and_lu_does_not():
    torch.manual_seed(3)
    model = _model()
    x = torch.randn(4, 6, dtype=torch.float64)
    for init in ("constant", "uniform"):
        adapted = dt.adapt(copy.deepcopy(model), LoLDUConfig(targets=None, init=init))
        assert not torch.allclose(adapted(x), model(x))
    with pytest.raises(ConfigError, match="init"):
        LoLDUConfig(init="zeros")


def test_convolutions_and_embeddings_are_refused_and_rank_is_bounded():
    with pytest.raises(UnsupportedLayerError, match="loldu cannot adapt"):
        dt.adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), LoLDUConfig(targets=["0"]))
    with pytest.raises(ConfigError, match="rank"):
        dt.adapt(_model(), LoLDUConfig(targets=None, rank=5))


def test_float32_model_keeps_lu_in_float64_and_merges_within_tolerance():
    model = _model().float()
    adapted = dt.adapt(copy.deepcopy(model), LoLDUConfig(targets=None))
    x = torch.randn(3, 6)
    torch.testing.assert_close(adapted(x), model(x), rtol=0, atol=0)
    for _, _, delta in dt.iter_deltas(adapted):
        with torch.no_grad():
            delta.loldu_diagonal.mul_(1.05)
    expected = adapted(x).detach()
    dt.merge(adapted)
    torch.testing.assert_close(adapted(x), expected, rtol=1e-5, atol=1e-5)

"""TLoRA: the TR / TRM contractions against dense float64 references built entry by entry, identity at init, the
identity regularizer's value and gradient, the residual forms, and refusals by name."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.functional.tensor_ring import (
    balanced_modes,
    identity_ring_cores,
    ring_matrix,
    ring_tensor,
    times_ring_matrix,
)
from deltatune.methods.tlora import TLoRAConfig


def _cores(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _flat(index, sizes):
    """Row-major flat index of a multi-index (the first mode most significant)."""
    flat = 0
    for i, size in zip(index, sizes):
        flat = flat * size + i
    return flat


def _hand_ring_matrix(cores):
    """T[ī, j̄] = tr(A¹[i₁, j₁] ⋯ A^D[i_D, j_D]), one entry at a time."""
    rows, cols = [c.shape[0] for c in cores], [c.shape[1] for c in cores]
    dense = torch.zeros(math.prod(rows), math.prod(cols), dtype=torch.float64)
    for i in itertools.product(*map(range, rows)):
        for j in itertools.product(*map(range, cols)):
            product = torch.eye(cores[0].shape[-1], dtype=torch.float64)
            for d, core in enumerate(cores):
                product = product @ core[i[d], j[d]]
            dense[_flat(i, rows), _flat(j, cols)] = torch.trace(product)
    return dense


def test_ring_matrix_matches_the_entrywise_definition():
    cores = _cores([(2, 3, 3, 3), (3, 2, 3, 3), (2, 2, 3, 3)])
    torch.testing.assert_close(ring_matrix(cores), _hand_ring_matrix(cores), rtol=0, atol=1e-12)


def test_ring_tensor_matches_the_entrywise_definition():
    cores = _cores([(2, 2, 2), (3, 2, 2), (2, 2, 2)])
    expected = torch.zeros(12, dtype=torch.float64)
    for index in itertools.product(range(2), range(3), range(2)):
        expected[_flat(index, (2, 3, 2))] = torch.trace(cores[0][index[0]] @ cores[1][index[1]] @ cores[2][index[2]])
    torch.testing.assert_close(ring_tensor(cores), expected, rtol=0, atol=1e-12)


def test_structured_product_equals_the_dense_product():
    cores = _cores([(2, 2, 3, 3), (3, 3, 3, 3), (4, 4, 3, 3)])
    weight = _cores([(5, 24)], seed=1)[0]
    torch.testing.assert_close(times_ring_matrix(weight, cores), weight @ _hand_ring_matrix(cores), rtol=0, atol=1e-12)


def test_rank_one_ring_matrix_is_the_kronecker_product():
    cores = _cores([(2, 2, 1, 1), (3, 3, 1, 1)])
    torch.testing.assert_close(ring_matrix(cores), torch.kron(cores[0][..., 0, 0], cores[1][..., 0, 0]))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_identity_cores_give_the_identity(rank):
    cores = identity_ring_cores((2, 3, 2), rank, torch.float64)
    torch.testing.assert_close(ring_matrix(cores), torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-15)


def test_balanced_modes_and_the_official_table():
    assert balanced_modes(384, 3) == (6, 8, 8) and balanced_modes(1536, 3) == (8, 12, 16)
    assert balanced_modes(7, 3) is None
    assert TLoRAConfig().modes_for(320, "x") == (4, 8, 10)  # the official table, not the search's (5, 8, 8)
    assert TLoRAConfig(modes={"320": [5, 64]}).modes_for(320, "x") == (5, 64)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 18)).double()


@pytest.mark.parametrize("residual", ["tensor_ring", "tensor_ring_matrix", "lora", "none"])
def test_each_residual_starts_at_the_base_and_merges_exactly(residual):
    base, x = _model(), torch.randn(4, 24, dtype=torch.float64)
    config = TLoRAConfig(targets=None, layer_types=("linear",), rank=2, transform_rank=2, residual=residual,
                         modes={"20": [4, 5], "24": [4, 6], "18": [3, 6]}, num_modes=2)
    model = dt.adapt(_model(), config)
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    expected = model(x).detach()
    for _, _, delta in dt.iter_deltas(model):
        weight = _model()[0].weight if delta.layer.in_features == 24 else _model()[2].weight
        residual_term = 0 if delta.residual() is None else delta.scale * delta.residual()
        dense = weight @ delta.transform() + residual_term
        torch.testing.assert_close(delta.adapted_weight(weight), dense, rtol=0, atol=1e-12)
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    dt.unmerge(model)
    for (name, value), (_, original) in zip(_plain(model), base.named_parameters()):
        assert torch.equal(value, original), name


def _plain(model):
    return [(n, p) for n, p in model.named_parameters() if ".deltas." not in f".{n}"]


def test_identity_regularizer_value_and_gradient():
    model = dt.adapt(_model(), TLoRAConfig(targets=None, layer_types=("linear",), transform_rank=2,
                                           identity_weight=0.5))
    deltas = [delta for _, _, delta in dt.iter_deltas(model)]
    assert float(dt.regularization_loss(model).detach()) == 0.0  # identity at init
    loss = dt.regularization_loss(model)
    loss.backward()
    assert all(torch.equal(c.grad, torch.zeros_like(c)) for d in deltas for c in d.transform_cores())
    core = deltas[0].transform_cores()[0]
    core.grad = None
    with torch.no_grad():
        core[0, 1, 0, 1] += 3.0  # one slice moves by 3 in one entry: its norm is 3
        core[1, 1, 1, 0] += 4.0  # another slice by 4
    value = deltas[0].regularization()
    assert float(value) == pytest.approx(0.5 * 7.0)
    value.backward()
    expected = torch.zeros_like(core)
    expected[0, 1, 0, 1], expected[1, 1, 1, 0] = 0.5, 0.5  # d‖v‖/dv = v/‖v‖ on the moved entries
    torch.testing.assert_close(core.grad, expected)


def test_no_regularizer_by_default():
    model = dt.adapt(_model(), TLoRAConfig(targets=None, layer_types=("linear",)))
    assert all(delta.regularization() is None for _, _, delta in dt.iter_deltas(model))


@pytest.mark.parametrize("field,value", [("rank", 0), ("transform_rank", -1), ("residual", "tt"), ("alpha", 0),
                                         ("num_modes", 0), ("identity_weight", -1.0), ("modes", {"20": [3, 7]})])
def test_bad_config_is_refused_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        TLoRAConfig(**{field: value})


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="residual"):
        TLoRAConfig(transform_rank=0, residual="none")


def test_a_prime_size_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(7, 8))
    with pytest.raises(ConfigError, match=r"size 7 cannot be split.*modes="):
        dt.adapt(model, TLoRAConfig(targets=None, layer_types=("linear",)))
    dt.adapt(nn.Sequential(nn.Linear(7, 8)), TLoRAConfig(targets=None, layer_types=("linear",), modes={"7": [7]}))


def test_ring_matrix_residual_needs_matching_mode_counts():
    model = nn.Sequential(nn.Linear(24, 8))
    with pytest.raises(ConfigError, match="as many output as input modes"):
        dt.adapt(model, TLoRAConfig(targets=None, layer_types=("linear",), residual="tensor_ring_matrix",
                                    modes={"8": [8]}))


def test_saved_tensor_names():
    model = dt.adapt(_model(), TLoRAConfig(targets=None, layer_types=("linear",)))
    names = {key.rsplit(".", 1)[-1] for key in dt.adapter_state_dict(model)}
    assert names == {"tlora_transform_0", "tlora_transform_1", "tlora_transform_2"} | {
        f"tlora_residual_{k}" for k in range(6)}

"""SketchTune: the layer runs W̃[i, j] = V[i, group(j), c[i, j]] (checked against a loop reference in float64), the
codes pack into b/8 byte per weight and back, our k-means sketch gives each weight its nearest centroid with an
error that never grows over Lloyd steps, and the refusals name the field."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.errors import ConfigError, NotMergeableError, UnsupportedLayerError
from deltatune.functional.sketch import (
    column_groups,
    group_sizes,
    kmeans_1d,
    pack_codes,
    packed_size,
    unpack_codes,
)
from deltatune.methods.sketchtune import SketchTuneConfig, sketch_bytes, sketch_deltas, sketch_with_activations


def _model(layer=nn.Linear, widths=(10, 12, 7)):
    torch.manual_seed(0)
    first, second = (nn.Linear(widths[0], widths[1]), nn.Linear(widths[1], widths[2])) if layer is nn.Linear else \
        (Conv1D(widths[1], widths[0]), Conv1D(widths[2], widths[1]))
    return nn.Sequential(first, nn.Tanh(), second).double()


def _deltas(model):
    return {path: delta for path, _, delta in sketch_deltas(model)}


# --- packing ------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from((2, 3, 4, 8)), count=st.integers(1, 300), seed=st.integers(0, 10_000))
def test_packing_round_trips_and_takes_bits_over_8_bytes_per_code(bits, count, seed):
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
    assert packed.numel() <= count * bits / 8 + bits  # at most one partly filled 8-code word
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_four_bit_codes_take_half_a_byte_per_weight():
    model = dt.adapt(nn.Sequential(nn.Linear(64, 32)), SketchTuneConfig(targets=None, groups_per_row=2))
    delta = _deltas(model)["0"]
    assert delta.sketch_codes.numel() == 64 * 32 // 2
    assert delta.sketch_table.shape == (32, 2, 16)
    assert sketch_bytes(model) == 64 * 32 // 2 + 32 * 2 * 16 * 4
    assert dt.trainable_parameters(model).trainable == 32 * 2 * 16


# --- the layer's weight -------------------------------------------------------------------------------------------
def _reference_weight(delta) -> torch.Tensor:
    """W̃ by explicit loops over (i, j): the paper's formula, nothing shared with the code under test."""
    out, columns = delta.layer.out_features, delta.layer.in_features
    codes = delta.codes()
    sizes = group_sizes(columns, delta.config.groups_per_row)
    group_of = [k for k, size in enumerate(sizes) for _ in range(size)]
    weight = torch.empty(out, columns, dtype=torch.float64)
    for i in range(out):
        for j in range(columns):
            weight[i, j] = delta.sketch_table[i, group_of[j], codes[i, j]]
    return weight


@pytest.mark.parametrize("layer", [nn.Linear, Conv1D])
@pytest.mark.parametrize("groups,bits", [(1, 4), (3, 2), (4, 3), (2, 8)])
def test_the_layer_runs_the_papers_gather_formula_in_float64(layer, groups, bits):
    model = dt.adapt(_model(layer), SketchTuneConfig(targets=None, groups_per_row=groups, bits=bits))
    with torch.no_grad():
        for delta in _deltas(model).values():
            delta.sketch_table.add_(0.05 * torch.randn_like(delta.sketch_table))  # as training would move it
    x = torch.randn(5, 10, dtype=torch.float64)
    hidden = x
    for index in ("0", "2"):
        delta = _deltas(model)[index]
        base = model.get_submodule(index).base_layer
        hidden = torch.nn.functional.linear(hidden, _reference_weight(delta), base.bias)
        hidden = torch.tanh(hidden) if index == "0" else hidden
    torch.testing.assert_close(model(x), hidden, rtol=0, atol=1e-13)


def test_groups_split_the_row_into_contiguous_blocks_even_when_the_width_does_not_divide():
    assert group_sizes(10, 4) == [3, 3, 2, 2]
    assert column_groups(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    model = dt.adapt(_model(), SketchTuneConfig(targets=None, groups_per_row=4))
    assert _deltas(model)["0"].groups_of_columns.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]


def test_a_group_with_at_most_2_to_the_b_distinct_values_is_sketched_exactly():
    linear = nn.Linear(16, 5).double()
    model = dt.adapt(copy.deepcopy(nn.Sequential(linear)), SketchTuneConfig(targets=None, groups_per_row=2, bits=3))
    delta = _deltas(model)["0"]
    assert delta.reconstruction_error(linear.weight) == 0.0
    torch.testing.assert_close(delta.sketched_weight(), linear.weight, rtol=0, atol=0)


def test_more_groups_per_row_never_sketch_worse_on_average():
    torch.manual_seed(3)
    linear = nn.Linear(256, 64).double()
    errors = []
    for groups in (1, 2, 4, 8):
        model = dt.adapt(nn.Sequential(copy.deepcopy(linear)), SketchTuneConfig(targets=None, groups_per_row=groups))
        errors.append(_deltas(model)["0"].reconstruction_error(linear.weight))
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0], errors
    assert 0 < errors[0] < 0.15, errors  # 16 levels per row: a few percent of ‖W‖


def test_the_table_gradient_is_the_scatter_add_of_the_dense_weight_gradient():
    model = dt.adapt(_model(), SketchTuneConfig(targets=["0"], groups_per_row=3))
    delta = _deltas(model)["0"]
    x = torch.randn(6, 10, dtype=torch.float64)
    weight = delta.sketched_matrix().detach().requires_grad_(True)
    output = model[2](torch.tanh(torch.nn.functional.linear(x, weight, model[0].bias)))
    output.square().sum().backward()
    model(x).square().sum().backward()
    expected = torch.zeros_like(delta.sketch_table)
    codes = delta.codes()
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            expected[i, delta.groups_of_columns[j], codes[i, j]] += weight.grad[i, j]
    torch.testing.assert_close(delta.sketch_table.grad, expected, rtol=0, atol=1e-12)


# --- k-means ------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 40), bits=st.sampled_from((2, 3, 4)),
       seed=st.integers(0, 10_000), weighted=st.booleans())
def test_kmeans_codes_are_nearest_centroids_and_the_error_never_grows(rows, width, bits, seed, weighted):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    values[:, : width // 3] = values[:, : width // 3].round()  # repeated values, as small groups have
    weights = torch.rand(rows, width, generator=generator, dtype=torch.float64) if weighted \
        else torch.ones(rows, width, dtype=torch.float64)
    centroids, codes, errors = kmeans_1d(values, weights, 1 << bits, iterations=6)
    assert centroids.shape == (rows, 1 << bits) and codes.shape == (rows, width)
    assert torch.all(centroids[:, 1:] >= centroids[:, :-1])
    chosen = (values - centroids.gather(1, codes)).abs()
    best = (values[:, :, None] - centroids[:, None, :]).abs().min(dim=2).values
    torch.testing.assert_close(chosen, best, rtol=0, atol=1e-12)
    scale = max(errors[0], 1.0)
    assert all(later <= earlier + 1e-12 * scale for earlier, later in zip(errors, errors[1:])), errors


def test_activation_weighting_lowers_the_output_error_on_unevenly_scaled_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).double()
    scales = 10 ** torch.linspace(-1.5, 1.0, 64, dtype=torch.float64)
    inputs = [torch.randn(128, 64, dtype=torch.float64) * scales for _ in range(2)]
    config = SketchTuneConfig(targets=None, groups_per_row=1, bits=2)
    plain = dt.adapt(nn.Sequential(copy.deepcopy(linear)), config)
    weighted = dt.adapt(nn.Sequential(copy.deepcopy(linear)), config)
    sketch_with_activations(weighted, inputs)
    test = torch.randn(512, 64, dtype=torch.float64) * scales
    with torch.no_grad():
        reference = linear(test)
        plain_error = (plain(test) - reference).square().mean()
        weighted_error = (weighted(test) - reference).square().mean()
    assert weighted_error < 0.8 * plain_error  # measured: 0.70x, (float(weighted_error), float(plain_error))


# --- merging, caching ---------------------------------------------------------------------------------------------
def test_unmerge_restores_the_dense_weight_and_is_refused_without_it():
    model = dt.adapt(_model(), SketchTuneConfig(targets=None))
    dense = model[0].weight.detach().clone()
    dt.merge(model)
    assert torch.equal(model[0].weight, _deltas(model)["0"].sketched_weight().detach())
    dt.unmerge(model)
    assert torch.equal(model[0].weight, dense)
    with pytest.raises(NotMergeableError, match="not kept"):
        _deltas(model)["0"].unmerge_from(model[0].weight, model[0].bias)


def test_the_cached_weight_is_rebuilt_when_the_table_changes():
    model = dt.adapt(_model(), SketchTuneConfig(targets=None, cache_weight=True)).eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        _deltas(model)["0"].sketch_table.mul_(1.5)
        changed = model(x)
    assert not torch.allclose(changed, first)
    uncached = dt.adapt(_model(), SketchTuneConfig(targets=None))
    with torch.no_grad():
        _deltas(uncached)["0"].sketch_table.mul_(1.5)
        torch.testing.assert_close(uncached(x), changed, rtol=0, atol=0)


# --- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,field", [({"bits": 5}, "bits"), ({"bits": 1}, "bits"),
                                          ({"groups_per_row": 0}, "groups_per_row"),
                                          ({"iterations": -1}, "iterations")])
def test_bad_fields_are_refused_by_name(fields, field):
    with pytest.raises(ConfigError, match=field):
        SketchTuneConfig(**fields)


def test_more_groups_than_columns_is_refused_naming_the_layer():
    with pytest.raises(ConfigError, match="groups_per_row=16 .*in_features = 10"):
        dt.adapt(_model(), SketchTuneConfig(targets=None, groups_per_row=16))


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.Embedding(10, 4)])
def test_convolutions_and_embeddings_are_refused(layer):
    with pytest.raises(UnsupportedLayerError, match="supports transformers Conv1D, nn.Linear"):
        dt.adapt(nn.Sequential(layer), SketchTuneConfig(targets=["0"]))

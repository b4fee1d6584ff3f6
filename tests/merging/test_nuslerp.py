"""NuSLERP and Multi-SLERP against float64 references of their formulas (with and without a base; per tensor,
per row, per column), their fallbacks, and refusals. Parity with real mergekit output: test_mergekit_parity.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError, MergeError
from deltatune.merging import merge_state_dicts
from deltatune.merging.methods.multislerp import MultiSlerpModelParams, MultiSlerpParams, multislerp
from deltatune.merging.methods.nuslerp import NuSlerpModelParams, NuSlerpParams, interpolation_t, nuslerp


def arc(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Shoemake's slerp of two vectors in float64 (lerp when colinear)."""
    cosine = float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    if 1 - cosine ** 2 <= 1e-16:
        return (1 - t) * a + t * b
    theta = math.acos(cosine)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def reference_nuslerp(t, v0, v1, flatten, row_wise):
    a, b = v0.numpy(), v1.numpy()
    if flatten:
        return arc(t, a.ravel(), b.ravel()).reshape(a.shape)
    if row_wise:  # vectors along the first axis
        return np.stack([arc(t, a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)
    return np.stack([arc(t, a[i], b[i]) for i in range(a.shape[0])])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(t=st.floats(0, 1), flatten=st.booleans(), row_wise=st.booleans(), seed=st.integers(0, 9999))
def test_nuslerp_is_slerp_per_tensor_row_or_column(t, flatten, row_wise, seed):
    generator = torch.Generator().manual_seed(seed)
    v0, v1 = (torch.randn(5, 7, generator=generator, dtype=torch.float64) for _ in range(2))
    got = nuslerp(t, v0, v1, flatten=flatten, row_wise=row_wise)
    np.testing.assert_allclose(got.numpy(), reference_nuslerp(t, v0, v1, flatten, row_wise), rtol=1e-10, atol=1e-10)


def test_weights_set_t_and_a_base_makes_it_a_slerp_of_task_vectors():
    assert interpolation_t([1.0, 3.0]) == 0.75 and interpolation_t([1.0, -1.0]) == 0.5
    generator = torch.Generator().manual_seed(2)
    base, first, second = (torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(3))
    models = [NuSlerpModelParams(weight=1.0), NuSlerpModelParams(weight=3.0)]
    with_base = merge_state_dicts("nuslerp", {"w": base}, [{"w": first}, {"w": second}], NuSlerpParams(), models)
    expected = base.numpy() + arc(0.75, (first - base).numpy().ravel(), (second - base).numpy().ravel()).reshape(4, 6)
    np.testing.assert_allclose(with_base["w"].numpy(), expected, rtol=1e-12, atol=1e-12)
    without = merge_state_dicts("nuslerp", None, [{"w": first}, {"w": second}], NuSlerpParams(), models)
    np.testing.assert_allclose(without["w"].numpy(), arc(0.75, first.numpy().ravel(),
                                                         second.numpy().ravel()).reshape(4, 6), rtol=1e-12)


def test_colinear_vectors_are_interpolated_linearly():
    v0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(nuslerp(0.25, v0, 2 * v0), 0.75 * v0 + 0.25 * (2 * v0))


def test_nuslerp_refuses_other_model_counts_and_bad_weights():
    one = {"w": torch.ones(3)}
    with pytest.raises(MergeError, match="exactly two models"):
        merge_state_dicts("nuslerp", one, [one, one, one])
    with pytest.raises(ConfigError, match="^weight="):
        NuSlerpModelParams(weight=float("nan"))
    with pytest.raises(ConfigError, match="^nuslerp_flatten="):
        NuSlerpParams(nuslerp_flatten="yes")


def reference_multislerp(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The weighted spherical barycentre by the tangent-space formula, float64 (eps 1e-8 as mergekit)."""
    w = np.array(weights) / sum(weights)
    flat = np.stack([v.ravel() for v in vectors])
    norms = np.linalg.norm(flat, axis=1)
    units = flat / (norms[:, None] + 1e-8)
    mean = (w[:, None] * units).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
    length = np.linalg.norm(tangent) + 1e-8
    return ((mean * math.cos(length) + tangent * math.sin(length) / length) * (w @ norms)).reshape(vectors[0].shape)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(count=st.integers(2, 4), seed=st.integers(0, 9999), with_base=st.booleans())
def test_multislerp_matches_the_float64_reference(count, seed, with_base):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    tensors = [base + torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(count)]
    weights = [float(w) for w in torch.rand(count, generator=generator, dtype=torch.float64) + 0.1]
    got = multislerp([t.clone() for t in tensors], weights, base if with_base else None)
    offsets = [(t - base).numpy() if with_base else t.numpy() for t in tensors]
    expected = reference_multislerp(offsets, weights) + (base.numpy() if with_base else 0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_two_orthogonal_unit_vectors_meet_at_the_bisector():
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(multislerp([a, b], [1.0, 1.0]), torch.tensor([0.5 ** 0.5] * 2, dtype=torch.float64))
    assert torch.equal(multislerp([a], [0.3]), a)


def test_multislerp_falls_back_to_the_weighted_sum_when_the_mean_direction_vanishes():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    got = multislerp([a, -a, torch.zeros(2, dtype=torch.float64)], [1.0, 1.0, 1.0])
    torch.testing.assert_close(got, torch.zeros(2, dtype=torch.float64))  # mergekit raises for 3 models


def test_multislerp_refuses_weights_that_cancel_and_a_bad_eps():
    one = {"w": torch.ones(3)}
    models = [MultiSlerpModelParams(weight=1.0), MultiSlerpModelParams(weight=-1.0)]
    with pytest.raises(MergeError, match="normalize_weights"):
        merge_state_dicts("multislerp", None, [one, one], MultiSlerpParams(), models)
    with pytest.raises(ConfigError, match="^eps="):
        MultiSlerpParams(eps=0.0)

"""SCE against a float64 reference of select (variance top-k) → calculate (mean-square weights) → erase (sign
election), its properties, and refusals. Parity with real mergekit output: test_mergekit_parity.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError
from deltatune.merging import merge_state_dicts
from deltatune.merging.methods.sce import SceParams, sce_merge, selection_mask


def reference(base: np.ndarray, tensors: list[np.ndarray], topk: float) -> np.ndarray:
    tau = np.stack([t - base for t in tensors])
    if topk < 1:
        variance = ((tau - tau.mean(0)) ** 2).mean(0)
        k = int(np.count_nonzero(variance) * topk)
        keep = np.zeros(variance.size, bool)
        keep[np.argsort(-variance.ravel(), kind="stable")[:k]] = True
        tau = tau * keep.reshape(variance.shape)
    energy = (tau ** 2).reshape(len(tensors), -1).mean(1)
    weights = np.full(len(tensors), 1 / len(tensors)) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    weights = weights.reshape(-1, *([1] * base.ndim))
    agree = np.sign(tau) == np.where(tau.sum(0) >= 0, 1.0, -1.0)
    return base + (weights * agree * tau).sum(0) / np.maximum((weights * agree).sum(0), 1e-6)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(topk=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]), count=st.integers(2, 4), seed=st.integers(0, 9999),
       shape=st.sampled_from([(10,), (8, 5), (2, 3, 4)]))
def test_sce_matches_the_float64_reference(topk, count, seed, shape):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    tensors = [base + torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(count)]
    merged = sce_merge(base, tensors, topk)
    expected = reference(base.numpy(), [t.numpy() for t in tensors], topk)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_selection_keeps_the_entries_where_the_models_disagree_most():
    tau = torch.tensor([[0.0, 1.0, 5.0, 2.0], [0.0, -1.0, -5.0, 2.0]], dtype=torch.float64)
    # variances 0, 1, 25, 0 → 2 varying entries; top half of them = the largest variance only
    assert selection_mask(tau, 0.5).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert selection_mask(tau, 0.0).tolist() == [0.0] * 4 and selection_mask(tau, 1.0).tolist() == [1.0] * 4


def test_the_larger_task_vector_weighs_more_and_minority_signs_are_erased():
    base = torch.zeros(2, dtype=torch.float64)
    big, small = torch.tensor([3.0, 3.0], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    merged = sce_merge(base, [big, small])
    w_big, w_small = 9 / 10, 1 / 10  # mean squares 9 and 1, normalized
    assert merged[0].item() == pytest.approx((w_big * 3 + w_small * 1) / (w_big + w_small))
    assert merged[1].item() == pytest.approx(3.0)  # −1 disagrees with the elected + sign: erased


def test_select_topk_outside_zero_one_is_refused_by_name():
    with pytest.raises(ConfigError, match="^select_topk="):
        SceParams(select_topk=1.5)
    with pytest.raises(ConfigError, match="^select_topk="):
        SceParams(select_topk=-0.1)


def test_sce_needs_a_base():
    from deltatune.errors import MergeError
    with pytest.raises(MergeError, match="needs a base"):
        merge_state_dicts("sce", None, [{"w": torch.ones(2)}, {"w": torch.zeros(2)}])

"""Model Breadcrumbs masks and merges against a float64 reference of mergekit 0.1.5's magnitude_outliers.

Bit-identity against real mergekit-yaml output: tests/merging/test_mergekit_parity.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError
from deltatune.merging import merge_state_dicts
from deltatune.merging.methods.breadcrumbs import BreadcrumbsModelParams, BreadcrumbsParams, breadcrumbs_mask


def reference_mask(delta, density, gamma):
    """Sort |δ| ascending; keep ranks [n − kept − top, n − top) with mergekit's counts."""
    n = delta.size
    kept, top = int(density * n), int(gamma * n)
    bottom = n - kept - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    ranks = np.argsort(np.abs(delta).ravel(), kind="stable")
    mask = np.zeros(n, bool)
    mask[ranks[bottom:n - top]] = True
    return mask.reshape(delta.shape)


@settings(max_examples=40, deadline=None)
@given(density=st.floats(0, 0.99), gamma=st.floats(0, 0.5), seed=st.integers(0, 10_000))
def test_breadcrumbs_mask_matches_the_reference(density, gamma, seed):
    delta = torch.randn(7, 30, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = breadcrumbs_mask(delta, density, gamma)
    assert np.array_equal(mask.numpy(), reference_mask(delta.numpy(), density, gamma))
    assert int(mask.sum()) == int(density * delta.numel())


def test_breadcrumbs_drops_the_outliers_and_the_small_entries():
    delta = torch.tensor([0.1, -5.0, 0.2, 0.3, -0.4, 0.5, 0.6, 0.7, 0.8, 0.9], dtype=torch.float64)
    mask = breadcrumbs_mask(delta, density=0.5, gamma=0.1)
    assert mask.tolist() == [False, False, False, False, False, True, True, True, True, True]


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_merge_is_task_arithmetic_on_the_masked_deltas(method):
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(200, generator=generator, dtype=torch.float64)
    tuned = [base + torch.randn(200, generator=generator, dtype=torch.float64) for _ in range(2)]
    models = [BreadcrumbsModelParams(weight=w, density=0.6, gamma=0.05) for w in (1.0, 0.5)]
    merged = merge_state_dicts(method, {"w": base}, [{"w": t} for t in tuned], BreadcrumbsParams(scaling=0.8),
                               models)["w"]
    deltas = [torch.from_numpy(np.where(reference_mask((t - base).numpy(), 0.6, 0.05), (t - base).numpy(), 0.0))
              for t in tuned]
    weighted = [m.weight * d for m, d in zip(models, deltas)]
    if method == "breadcrumbs_ties":  # sign elected from the weighted sum, disagreeing entries dropped
        sign = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
        weighted = [torch.where(torch.sign(w) == sign, w, torch.zeros_like(w)) for w in weighted]
    torch.testing.assert_close(merged, base + 0.8 * sum(weighted))


def test_breadcrumbs_rejects_gamma_outside_the_unit_interval():
    with pytest.raises(ConfigError, match="gamma"):
        BreadcrumbsModelParams(gamma=1.5)

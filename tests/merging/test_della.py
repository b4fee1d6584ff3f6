"""DELLA (della, della_linear) against a float64 reference of MAGPRUNE + TIES / task arithmetic, the keep rule's
statistics, mergekit's YAML defaults, and refusals. Parity with real mergekit output: test_mergekit_parity.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError
from deltatune.merging import config_from_dict, plan_merge
from deltatune.merging.methods.della import (
    DellaLinearParams,
    DellaModelParams,
    DellaParams,
    keep_probabilities,
    magprune,
)
from deltatune.merging.registry import MergeInputs, merge_method
from merging.tiny_checkpoints import make_models


def reference_probabilities(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """p = (d − ε) + 2ε · (rank − 1)/(n − 1), rank 1 = smallest |δ| along axis 1 (a row of a matrix; mergekit
    ranks along dim 1 for higher-dimensional tensors too), float64, stable ranks."""
    rows = delta.reshape(1, -1) if delta.ndim == 1 else delta
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    return (density - epsilon) + 2 * epsilon * ranks / (n - 1)


def reference_della(base, tensors, weights, densities, epsilons, seeds, consensus, normalize, scaling):
    """MAGPRUNE (masks drawn with the given seeds) → L1 rescale → weights → [TIES election] → sum, in float64."""
    weighted = []
    for tensor, w, d, e, seed in zip(tensors, weights, densities, epsilons, seeds):
        delta = (tensor - base).numpy()
        p = torch.from_numpy(reference_probabilities(delta, d, e))
        mask = torch.bernoulli(p, generator=torch.Generator().manual_seed(seed)).numpy().reshape(delta.shape)
        kept = delta * mask
        if np.abs(delta).sum() >= 1e-7 and np.abs(kept).sum() >= 1e-7:
            kept = kept * np.abs(delta).sum() / np.abs(kept).sum()
        weighted.append(w * kept)
    stacked, w = np.stack(weighted), np.array(weights).reshape(-1, *([1] * base.dim()))
    if consensus:
        agree = np.sign(stacked) == np.where(stacked.sum(0) >= 0, 1.0, -1.0)
        merged, divisor = (stacked * agree).sum(0), (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        merged, divisor = stacked.sum(0), w.sum()
    if normalize:
        merged = merged / divisor
    return base + torch.from_numpy(scaling * merged)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(shape=st.sampled_from([(9,), (6, 11), (3, 4, 5)]), density=st.floats(0.2, 0.8),
       spread=st.floats(0, 0.99), seed=st.integers(0, 10_000))
def test_keep_probabilities_rise_linearly_with_the_magnitude_rank(shape, density, spread, seed):
    epsilon = spread * min(density, 1 - density)
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = keep_probabilities(delta, density, epsilon)
    expected = reference_probabilities(delta.numpy(), density, epsilon)
    np.testing.assert_allclose(got.reshape(expected.shape).numpy(), expected, rtol=0, atol=1e-12)
    assert abs(float(got.mean()) - density) < 1e-12  # the mean keep probability is the density


def test_the_empirical_keep_rate_per_rank_is_the_probability():
    rows = torch.arange(1, 12, dtype=torch.float32).repeat(4000, 1)  # every row ranks its columns 1..11
    kept = magprune(rows, 0.5, 0.3, torch.Generator().manual_seed(0), rescale="none") != 0
    rate = kept.float().mean(dim=0)
    expected = torch.linspace(0.2, 0.8, 11)
    assert (rate - expected).abs().max() < 0.03, rate  # σ ≈ 0.008 per column


@pytest.mark.parametrize("rescale", ["l1", "inverse_probability", "none"])
def test_magprune_keeps_or_drops_entries_and_rescales(rescale):
    delta = torch.randn(20, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = magprune(delta.clone(), 0.4, 0.2, torch.Generator().manual_seed(2), rescale)
    kept = out != 0
    probabilities = keep_probabilities(delta, 0.4, 0.2)
    if rescale == "l1":
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum())
        factor = delta.abs().sum() / delta[kept].abs().sum()
        torch.testing.assert_close(out[kept], delta[kept] * factor)
    elif rescale == "inverse_probability":
        torch.testing.assert_close(out[kept], delta[kept] / probabilities[kept])
    else:
        assert torch.equal(out[kept], delta[kept])


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_merge_matches_the_float64_reference(method):
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(12, 10, generator=generator, dtype=torch.float64)
    tensors = [base + 0.1 * torch.randn(12, 10, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights, densities, epsilons = [0.5, 0.3, -0.2], [0.5, 0.7, 0.3], [0.1, 0.15, 0.2]
    params = DellaParams(scaling=0.8, rescale="l1") if method == "della" else \
        DellaLinearParams(scaling=0.8, normalize=True, rescale="l1")
    models = [DellaModelParams(weight=w, density=d, epsilon=e) for w, d, e in zip(weights, densities, epsilons)]
    inputs = MergeInputs("w", base.clone(), [t.clone() for t in tensors], models, params,
                         generator=lambda index: torch.Generator().manual_seed(40 + index))
    merged = merge_method(method).merge(inputs)
    expected = reference_della(base, tensors, weights, densities, epsilons, [40, 41, 42],
                               method == "della", True, 0.8)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)


def test_a_one_entry_row_and_a_scalar_are_kept_with_probability_density():
    assert torch.equal(keep_probabilities(torch.tensor(3.0), 0.4, 0.1), torch.tensor([[0.4]]))
    assert torch.equal(keep_probabilities(torch.ones(5, 1), 0.4, 0.1), torch.full((5, 1), 0.4))


def test_a_mergekit_yaml_gets_mergekits_defaults(tmp_path):
    base_dir, dirs, _, _ = make_models(tmp_path, count=2)
    raw = {"merge_method": "della", "base_model": str(base_dir), "models": [{"model": str(d)} for d in dirs]}
    plan = plan_merge(config_from_dict(raw), tmp_path / "out")
    params, models = plan.resolver.resolve("model.layers.0.mlp.up_proj.weight")
    assert [m.density for m in models] == [1.0, 1.0] and models[0].epsilon == 0.15
    assert params.normalize is True and params.rescale == "l1" and params.scaling == 1.0
    assert DellaLinearParams().normalize is False and DellaParams().rescale == "inverse_probability"  # paper
    assert DellaParams(rescale=True).rescale == "l1" and DellaParams(rescale=False).rescale == "none"


@pytest.mark.parametrize("values,field", [({"density": 0.1, "epsilon": 0.15}, "epsilon"),
                                          ({"density": 0.9, "epsilon": 0.1}, "epsilon"),
                                          ({"epsilon": -0.1}, "epsilon"), ({"density": 1.5}, "density")])
def test_bad_density_epsilon_combinations_are_refused_by_name(values, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        DellaModelParams(**values)
    DellaModelParams(density=1.0, epsilon=0.4)  # nothing is dropped: any epsilon below 0.5 is fine
    DellaModelParams(density=0.0)  # drops everything, as mergekit


def test_a_bad_rescale_and_a_bad_yaml_epsilon_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="^rescale="):
        DellaParams(rescale="inverse_density")
    base_dir, dirs, _, _ = make_models(tmp_path, count=1)
    raw = {"merge_method": "della_linear", "base_model": str(base_dir),
           "models": [{"model": str(dirs[0]), "parameters": {"density": 0.9, "epsilon": 0.2}}]}
    with pytest.raises(ConfigError, match="epsilon=0.2"):
        plan_merge(config_from_dict(raw), tmp_path / "out")

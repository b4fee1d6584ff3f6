"""LMC barrier and linear CKA (deltatune.train.landscape) against hand computations and known properties."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from deltatune.errors import ConfigError
from deltatune.train.landscape import barrier_height, linear_cka, lmc_barrier, recompute_batch_norm


# --- the barrier -----------------------------------------------------------------------------------------------
def test_barrier_of_a_hump_is_negative_endpoint_mean_minus_the_peak() -> None:
    barrier, index = barrier_height([0.1, 0.3, 0.5, 0.2, 0.1])
    assert index == 2
    assert barrier == pytest.approx(0.1 - 0.5)


def test_barrier_of_a_dip_is_positive_and_the_largest_deviation_wins() -> None:
    # endpoint mean 0.3: deviations 0, 0.25 (dip to 0.05), 0.1 (0.4), 0: the dip is the larger one
    barrier, index = barrier_height([0.2, 0.05, 0.4, 0.4])
    assert (barrier, index) == (pytest.approx(0.3 - 0.05), 1)


def test_barrier_ties_take_the_first_point_and_endpoints_count() -> None:
    assert barrier_height([0.0, 0.2, 0.2, 0.0]) == (pytest.approx(-0.2), 1)
    # a flat path: every deviation is 0, the first point (an endpoint) is α*
    assert barrier_height([0.1, 0.1, 0.1]) == (pytest.approx(0.0), 0)


def test_barrier_needs_three_points() -> None:
    with pytest.raises(ConfigError, match="at least 3 points"):
        barrier_height([0.1, 0.2])


class _Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value], dtype=torch.float64))


def test_lmc_curve_is_the_error_at_evenly_spaced_interpolations() -> None:
    a, b = _Scalar(-1.0), _Scalar(3.0)
    before = (a.w.detach().clone(), b.w.detach().clone())
    # error(w) = 0.1 + 0.01·(4 − (w − 1)²): 0.1 at both ends, 0.14 in the middle (α = 0.5, w = 1)
    curve = lmc_barrier(a, b, lambda m: 0.1 + 0.01 * (4 - (m.w.item() - 1.0) ** 2), points=5)
    assert curve.alphas == pytest.approx((0.0, 0.25, 0.5, 0.75, 1.0))
    expected = [0.1 + 0.01 * (4 - ((-1 + 4 * t) - 1) ** 2) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert curve.errors == pytest.approx(expected, abs=1e-12)
    assert curve.barrier == pytest.approx(-0.04, abs=1e-12)
    assert curve.alpha_star == 0.5
    assert torch.equal(a.w, before[0]) and torch.equal(b.w, before[1])  # inputs untouched


def test_lmc_default_is_the_codes_eleven_points_and_endpoints_are_candidates() -> None:
    # a straight error path from 0 to 1: the endpoints deviate most from their mean (0.5), the first wins, so
    # the code's formula gives ½(e1 − e0) = +0.5 one way and −0.5 the other (documented in the module)
    curve = lmc_barrier(_Scalar(0.0), _Scalar(1.0), lambda m: m.w.item())
    assert len(curve.errors) == 11
    assert (curve.barrier, curve.alpha_star) == (pytest.approx(0.5), 0.0)
    assert lmc_barrier(_Scalar(1.0), _Scalar(0.0), lambda m: m.w.item()).barrier == pytest.approx(-0.5)


def test_lmc_refuses_different_architectures() -> None:
    with pytest.raises(ConfigError, match="shape"):
        lmc_barrier(nn.Linear(2, 3), nn.Linear(2, 4), lambda m: 0.0)


# --- BatchNorm: re-estimated at every point, as the code's update_bn -------------------------------------------
def _norm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()


def test_lmc_refuses_batch_norm_without_inputs_to_re_estimate_it() -> None:
    with pytest.raises(ConfigError, match="norm_inputs"):
        lmc_barrier(_norm_model(), _norm_model(), lambda m: 0.0)


def test_recomputed_statistics_are_the_size_weighted_average_over_batches() -> None:
    model = _norm_model()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, generator=generator, dtype=torch.float64) for n in (5, 2, 9)]  # unequal sizes
    model[1].running_mean.fill_(7.0)  # stale statistics must not leak in
    model.eval()
    recompute_batch_norm(model, batches)
    with torch.no_grad():
        hidden = [model[0](x) for x in batches]
    sizes = torch.tensor([float(h.shape[0]) for h in hidden], dtype=torch.float64)
    means = torch.stack([h.mean(0) for h in hidden])
    variances = torch.stack([h.var(0, unbiased=True) for h in hidden])
    expected_mean = (sizes[:, None] * means).sum(0) / sizes.sum()
    expected_var = (sizes[:, None] * variances).sum(0) / sizes.sum()
    torch.testing.assert_close(model[1].running_mean, expected_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, expected_var, rtol=0, atol=1e-12)
    assert not model.training and model[1].momentum == 0.1  # mode and momentum restored


def test_lmc_with_batch_norm_evaluates_re_estimated_statistics_at_each_point() -> None:
    a = _norm_model()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.mul_(-2.0)
    inputs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)]
    seen = []

    def evaluate(model: nn.Module) -> float:
        reference = copy.deepcopy(model)
        recompute_batch_norm(reference, inputs)
        torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
        seen.append(model[1].running_mean.clone())
        return 0.0

    lmc_barrier(a, b, evaluate, points=3, norm_inputs=inputs)
    assert not torch.allclose(seen[0], seen[2])  # the two ends have their own statistics


# --- linear CKA ------------------------------------------------------------------------------------------------
def _gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = XXᵀ, L = YYᵀ, H = I − 11ᵀ/n (Kornblith et al. Eq. 3–4)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, m = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * m).sum() / torch.sqrt((k * k).sum() * (m * m).sum()))


matrices = st.tuples(st.integers(4, 12), st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))


def _pair(shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    n, p, q, seed = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(p, q, generator=generator, dtype=torch.float64) + torch.randn(n, q, generator=generator,
                                                                                        dtype=torch.float64)
    return x, y


@given(matrices)
def test_cka_equals_the_centred_gram_formula(shape) -> None:
    x, y = _pair(shape)
    assert linear_cka(x, y) == pytest.approx(_gram_cka(x, y), abs=1e-10)


@given(matrices)
def test_cka_is_one_on_identical_inputs_and_symmetric(shape) -> None:
    x, y = _pair(shape)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)


@given(matrices, st.floats(0.01, 100.0))
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(shape, scale) -> None:
    x, y = _pair(shape)
    generator = torch.Generator().manual_seed(shape[3] + 1)
    q, _ = torch.linalg.qr(torch.randn(y.shape[1], y.shape[1], generator=generator, dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x, y @ q) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x * scale, y) == pytest.approx(base, abs=1e-10)


def test_cka_is_not_invariant_to_anisotropic_scaling() -> None:
    x, _ = _pair((10, 3, 3, 0))
    assert linear_cka(x, x * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)) < 0.99


def test_cka_is_translation_invariant_and_flattens_trailing_dimensions() -> None:
    x, y = _pair((8, 6, 4, 3))
    assert linear_cka(x + 5.0, y) == pytest.approx(linear_cka(x, y), abs=1e-12)
    assert linear_cka(x.reshape(8, 2, 3), y) == pytest.approx(linear_cka(x, y), abs=1e-12)


def test_cka_refuses_mismatched_rows_and_constant_features() -> None:
    with pytest.raises(ConfigError, match="same examples"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ConfigError, match="undefined"):
        linear_cka(torch.ones(4, 2), torch.randn(4, 2))

"""The Fréchet distance against closed forms of the 2-Wasserstein distance between Gaussians."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.data.frechet import fd_cnn, frechet_distance, frechet_distance_gaussians, gaussian_statistics
from deltatune.errors import ConfigError


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q


def random_covariance(dim: int, seed: int, rank: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, rank or dim, generator=generator, dtype=torch.float64)
    return factor @ factor.T


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 12), seed=st.integers(0, 10_000), shift=st.floats(-3, 3))
def test_commuting_covariances_give_the_closed_form(dim, seed, shift):
    # Same eigenvectors: tr((A^1/2 B A^1/2)^1/2) = sum sqrt(a_i b_i), so FD = |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2.
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(dim, generator=generator, dtype=torch.float64) * 4
    b = torch.rand(dim, generator=generator, dtype=torch.float64) * 4
    rotation = random_rotation(dim, seed + 1)
    mean_a = torch.randn(dim, generator=generator, dtype=torch.float64)
    mean_b = mean_a + shift
    expected = dim * shift ** 2 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    got = frechet_distance_gaussians(mean_a, rotation @ torch.diag(a) @ rotation.T,
                                     mean_b, rotation @ torch.diag(b) @ rotation.T)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 10), seed=st.integers(0, 10_000), scale=st.floats(0.0, 3.0))
def test_scaled_covariance_gives_the_closed_form(dim, seed, scale):
    # N(0, A) vs N(0, c^2 A), any A: W2^2 = (1 - c)^2 tr(A).
    cov = random_covariance(dim, seed)
    zero = torch.zeros(dim, dtype=torch.float64)
    expected = (1 - scale) ** 2 * float(torch.trace(cov))
    assert frechet_distance_gaussians(zero, cov, zero, scale ** 2 * cov) == pytest.approx(expected, rel=1e-8, abs=1e-8)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_general_covariances_match_the_1d_projection_free_reference(dim, seed):
    # Reference: tr((A^1/2 B A^1/2)^1/2) = sum of sqrt(eigenvalues of A B) (A B is similar to A^1/2 B A^1/2).
    a, b = random_covariance(dim, seed), random_covariance(dim, seed + 7)
    mean_a, mean_b = torch.zeros(dim, dtype=torch.float64), torch.ones(dim, dtype=torch.float64)
    cross = torch.linalg.eigvals(a @ b).real.clamp(min=0).sqrt().sum()
    expected = dim + float(torch.trace(a) + torch.trace(b) - 2 * cross)
    got = frechet_distance_gaussians(mean_a, a, mean_b, b)
    assert got == pytest.approx(expected, rel=1e-7, abs=1e-7)
    assert got == pytest.approx(frechet_distance_gaussians(mean_b, b, mean_a, a), rel=1e-9, abs=1e-9)  # symmetric


def test_singular_covariances_stay_real_and_exact():
    cov = random_covariance(6, 0, rank=2)  # rank 2 of 6: the case scipy's sqrtm needs an epsilon for
    zero = torch.zeros(6, dtype=torch.float64)
    assert frechet_distance_gaussians(zero, cov, zero, cov) == pytest.approx(0.0, abs=1e-8)
    # sqrt of the round-off (~1e-15) eigenvalues of the null space adds ~1e-7: the tolerance of a singular case
    assert frechet_distance_gaussians(zero, cov, zero, 4 * cov) == pytest.approx(float(torch.trace(cov)), rel=1e-6)


def test_one_dimensional_gaussians():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    got = frechet_distance_gaussians(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]),
                                     torch.tensor([[9.0]]))
    assert got == pytest.approx(9.0 + 1.0)


def test_sample_statistics_and_distance_of_samples():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(20_000, 3, generator=generator, dtype=torch.float64)
    mean, cov = gaussian_statistics(samples * 2 + 1)
    assert torch.allclose(mean, torch.ones(3, dtype=torch.float64), atol=0.05)
    assert torch.allclose(cov, 4 * torch.eye(3, dtype=torch.float64), atol=0.15)
    other = torch.randn(20_000, 3, generator=generator, dtype=torch.float64)
    assert frechet_distance(samples, other) < 0.01
    assert frechet_distance(samples, other + 1) == pytest.approx(3.0, abs=0.05)
    assert math.isfinite(frechet_distance(samples[:5], other[:5]))  # fewer samples than needed for full rank


def test_fd_cnn_with_a_given_feature_function():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(200, 1, 16, 16, generator=generator)
    assert fd_cnn(real, real, network=lambda pixels: pixels.flatten(1)[:, :8]) == pytest.approx(0.0, abs=1e-9)
    shifted = fd_cnn((real + 0.5), real, network=lambda pixels: pixels.flatten(1)[:, :8])
    assert shifted == pytest.approx(8 * 0.25, rel=1e-6)


def test_bad_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="expected means"):
        frechet_distance_gaussians(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(3))
    with pytest.raises(ConfigError, match="N >= 2"):
        gaussian_statistics(torch.zeros(1, 4))

"""HiPA's high-frequency-promoting loss: each filter against a float64 reference, and the loss's behaviour."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError, TrainingError
from deltatune.train.high_frequency import HighFrequencyLoss, fourier_high_pass, sobel_magnitude


def _reference_high_pass(image: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Explicit DFT matrices in float64: X = F_h x F_w^T, zero bins with radius <= cutoff, invert."""
    height, width = image.shape

    def dft(n: int) -> torch.Tensor:
        k = torch.arange(n, dtype=torch.float64)
        return torch.exp(-2j * math.pi * torch.outer(k, k) / n)

    def frequency(n: int) -> torch.Tensor:  # cycles per pixel, numpy's fftfreq order
        k = torch.arange(n, dtype=torch.float64)
        return torch.where(k < (n + 1) // 2, k, k - n) / n

    spectrum = dft(height) @ image.to(torch.complex128) @ dft(width).T
    radius = (frequency(height).unsqueeze(1) ** 2 + frequency(width).unsqueeze(0) ** 2).sqrt()
    spectrum = spectrum * (radius > cutoff)
    return (dft(height).conj() @ spectrum @ dft(width).conj().T / (height * width)).real


@settings(deadline=None)
@given(st.integers(4, 12), st.integers(4, 12), st.floats(0.05, 0.45), st.integers(0, 2**31 - 1))
def test_high_pass_matches_an_explicit_dft(height, width, cutoff, seed):
    image = torch.randn(height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(fourier_high_pass(image, cutoff), _reference_high_pass(image, cutoff),
                               rtol=0, atol=1e-10)


def test_high_pass_removes_low_and_keeps_high_frequencies():
    x = torch.arange(16, dtype=torch.float64)
    low = torch.cos(2 * math.pi * 2 / 16 * x).expand(16, 16)      # 0.125 cycles per pixel
    high = torch.cos(2 * math.pi * 6 / 16 * x).expand(16, 16)     # 0.375 cycles per pixel
    torch.testing.assert_close(fourier_high_pass(torch.full((16, 16), 3.0, dtype=torch.float64)),
                               torch.zeros(16, 16, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(fourier_high_pass(low + high, 0.25), high.clone(), rtol=0, atol=1e-12)


def test_sobel_magnitude_of_a_step_edge():
    image = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    image[..., 3:] = 1.0
    magnitude = sobel_magnitude(image, eps=0.0)
    # the Sobel x kernel sums (1 + 2 + 1) times the unit step on the two columns beside it; flat elsewhere
    assert torch.equal(magnitude[0, 0, :, 2:4], torch.full((6, 2), 4.0, dtype=torch.float64))
    assert magnitude[0, 0, :, :2].abs().max() == 0 and magnitude[0, 0, :, 4:].abs().max() == 0


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_images_cost_nothing_and_blur_costs_high_frequencies():
    target = _images()
    loss = HighFrequencyLoss()
    assert float(loss(target, target)) == pytest.approx(0.0, abs=1e-12)
    blurred = F.avg_pool2d(F.pad(target, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    shifted = target + 0.05  # the same detail, brighter: only the spatial term sees it
    blur_terms, shift_terms = loss.terms(blurred, target), loss.terms(shifted, target)
    assert float(shift_terms["fourier"]) < 1e-12 and float(shift_terms["edge"]) < 1e-12
    assert float(blur_terms["fourier"]) > 0.05 and float(blur_terms["edge"]) > 0.1
    assert blur_terms["fourier"] > 100 * shift_terms["fourier"]


def test_the_loss_is_the_weighted_sum_and_trains():
    target, start = _images(1), _images(2).requires_grad_(True)
    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8)).double().requires_grad_(False)
    loss = HighFrequencyLoss(fourier_weight=2.0, edge_weight=0.5, perceptual_weight=3.0, features=features)
    terms = loss.terms(start, target)
    expected = terms["spatial"] + 3.0 * terms["perceptual"] + 2.0 * terms["fourier"] + 0.5 * terms["edge"]
    value = loss(start, target)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert start.grad is not None and start.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,name", [({"fourier_weight": -1.0}, "fourier_weight"),
                                         ({"edge_weight": float("nan")}, "edge_weight"),
                                         ({"cutoff": 0.5}, "cutoff"), ({"cutoff": 0.0}, "cutoff")])
def test_bad_settings_are_refused_by_name(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        HighFrequencyLoss(**kwargs)


def test_mismatched_shapes_are_refused():
    with pytest.raises(TrainingError, match=r"expected two \(B, C, H, W\)"):
        HighFrequencyLoss()(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))

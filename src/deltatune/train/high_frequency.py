"""HiPA's adaptation loss: a spatial term plus a high-frequency-promoting term (Fourier high-pass and edges).

HiPA (Zhang & Hooi, 2023, arXiv 2311.18158) trains LoRA adaptors so that a diffusion model denoises in ONE
step, against the multi-step model's own samples. One-step outputs lack high frequencies, so the loss couples a
spatial (perceptual) loss with a "high-frequency promoted loss" built from Fourier high-frequency components and
edge information. The paper's abstract and summary name these parts; its filters and weights are not in our
notes and no code was released, so the choices below are ours, labelled as such:

- spatial: mean squared error between output and target, plus (when `features` is given) the squared
  distance of a frozen network's features, a stand-in for the paper's perceptual (LPIPS-style) loss;
- Fourier: L1 distance of the two images' high-pass parts, the spectrum zeroed at radial frequencies up to
  `cutoff` cycles per pixel (Nyquist = 0.5) and transformed back; phase and amplitude both count;
- edges: L1 distance of the Sobel gradient magnitudes.

    loss = mse + perceptual_weight * feature_mse + fourier_weight * L1(HP(x̂) - HP(x)) + edge_weight * L1(|∇x̂| - |∇x|)

It is a loss over images and knows nothing of deltas: use it with any method, as `loss_fn` of the Trainer
(outputs = the predicted images, labels = the target images, both (B, C, H, W)).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ConfigError, TrainingError

NYQUIST = 0.5
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def high_pass_mask(height: int, width: int, cutoff: float, device: torch.device | None = None) -> Tensor:
    """(H, W) boolean mask of the DFT bins whose radial frequency (cycles per pixel) is above `cutoff`."""
    fy = torch.fft.fftfreq(height, device=device).unsqueeze(1)
    fx = torch.fft.fftfreq(width, device=device).unsqueeze(0)
    return (fy.square() + fx.square()).sqrt() > cutoff


def fourier_high_pass(images: Tensor, cutoff: float = 0.25) -> Tensor:
    """The part of `images` (..., H, W) above `cutoff` cycles per pixel: the 2-D spectrum with the low bins zeroed,
    transformed back (real part; the mask is symmetric, so the imaginary part is rounding only)."""
    mask = high_pass_mask(images.shape[-2], images.shape[-1], cutoff, images.device)
    spectrum = torch.fft.fft2(images.to(torch.promote_types(images.dtype, torch.float32)))
    return torch.fft.ifft2(spectrum * mask).real.to(images.dtype)


def sobel_magnitude(images: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-channel Sobel gradient magnitude of (B, C, H, W) images (replicate padding keeps the size); `eps` keeps
    the square root differentiable on flat regions."""
    channels = images.shape[1]
    kernel_x = torch.tensor(_SOBEL_X, dtype=images.dtype, device=images.device)
    kernels = torch.stack([kernel_x, kernel_x.t()]).unsqueeze(1).repeat(channels, 1, 1, 1)  # (2C, 1, 3, 3)
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gradients = F.conv2d(padded, kernels, groups=channels).unflatten(1, (channels, 2))
    return (gradients.square().sum(dim=2) + eps).sqrt()


class HighFrequencyLoss(nn.Module):
    """HiPA's adaptation loss between predicted and target images (see the module docstring for the terms).

    `features`: a frozen network mapping images to (B, D) features for the perceptual term (None: no such term).
    Weights must be finite and >= 0; `cutoff` in (0, 0.5) cycles per pixel. Call as `loss(predicted, target)`.
    """

    def __init__(self, *, fourier_weight: float = 1.0, edge_weight: float = 1.0, perceptual_weight: float = 1.0,
                 cutoff: float = 0.25, features: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        for name, value in (("fourier_weight", fourier_weight), ("edge_weight", edge_weight),
                            ("perceptual_weight", perceptual_weight)):
            if not (value >= 0 and value < float("inf")):
                raise ConfigError(f"{name}={value} is invalid: expected a finite weight >= 0 (0 drops the term)")
        if not 0 < cutoff < NYQUIST:
            raise ConfigError(f"cutoff={cutoff} is invalid: expected cycles per pixel in (0, {NYQUIST}); 0.25 keeps "
                              "the upper half of the band")
        self.fourier_weight, self.edge_weight, self.perceptual_weight = fourier_weight, edge_weight, perceptual_weight
        self.cutoff = cutoff
        self.features = features

    def terms(self, predicted: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Each term of the loss, unweighted (0-dim tensors): spatial, perceptual (if features), fourier, edge."""
        if predicted.shape != target.shape or predicted.dim() != 4:
            raise TrainingError(f"HighFrequencyLoss got predicted {tuple(predicted.shape)} and target "
                                f"{tuple(target.shape)}: expected two (B, C, H, W) image batches of the same shape")
        target = target.to(predicted.dtype)
        high_pass = [fourier_high_pass(images, self.cutoff) for images in (predicted, target)]
        terms = {"spatial": F.mse_loss(predicted, target), "fourier": F.l1_loss(*high_pass),
                 "edge": F.l1_loss(sobel_magnitude(predicted), sobel_magnitude(target))}
        if self.features is not None:
            with torch.no_grad():
                wanted = self.features(target)
            terms["perceptual"] = F.mse_loss(self.features(predicted), wanted)
        return terms

    def forward(self, predicted: Tensor, target: Tensor) -> Tensor:
        terms = self.terms(predicted, target)
        weights = {"spatial": 1.0, "perceptual": self.perceptual_weight, "fourier": self.fourier_weight,
                   "edge": self.edge_weight}
        return sum(weights[name] * value for name, value in terms.items())

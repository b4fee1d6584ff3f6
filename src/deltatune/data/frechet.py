"""The Fréchet distance between two sets of feature vectors, and FD-CNN: that distance in a frozen CNN's features.

The Fréchet (2-Wasserstein) distance between the Gaussians N(mu_a, S_a) and N(mu_b, S_b) fitted to two sets of
feature vectors (Dowson & Landau 1982; the formula behind FID, Heusel et al. 2017):

    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))

computed in float64. The trace of the matrix square root goes through two symmetric eigendecompositions
(S_a^(1/2) from eigh(S_a), then the eigenvalues of the symmetric PSD product), with round-off negative
eigenvalues clipped to 0, so it is real and exact for singular covariances too (unlike scipy's sqrtm of the
non-symmetric S_a S_b, which FID code then has to patch with an epsilon).

FD-CNN (`fd_cnn`): the FD of the `features(pixels) -> (B, D)` of a frozen network, by default the pretrained
GlyphCNN, between generated and real images. It is FID-*style*: not Inception FID (no Inception network, 16x16
grayscale inputs, a few hundred samples), so its values compare only with other FD-CNN values computed with the
same feature network and sample counts (the estimate is biased upwards at small sample counts).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError

FeatureFn = Callable[[Tensor], Tensor]


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (D,), covariance (D, D)) of feature vectors (N, D), in float64; the covariance is unbiased (N - 1)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ConfigError(f"features of shape {tuple(features.shape)} are invalid: expected (N, D) with N >= 2")
    values = features.detach().to(torch.float64)
    mean = values.mean(dim=0)
    centered = values - mean
    return mean, centered.T @ centered / (values.shape[0] - 1)


def _symmetric_sqrt(matrix: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_gaussians(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """The Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b) (module docstring), in float64."""
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mean_a.shape * 2:
        raise ConfigError(f"Gaussian parameters of shapes {tuple(mean_a.shape)}, {tuple(cov_a.shape)}, "
                          f"{tuple(mean_b.shape)}, {tuple(cov_b.shape)} do not match: expected means (D,) and "
                          "covariances (D, D) of one D")
    mean_a, cov_a, mean_b, cov_b = (t.to(torch.float64) for t in (mean_a, cov_a, mean_b, cov_b))
    root_a = _symmetric_sqrt(cov_a)
    product = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(distance.clamp(min=0))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """The Fréchet distance between the Gaussians fitted to two sets of feature vectors (N_a, D) and (N_b, D)."""
    return frechet_distance_gaussians(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


@torch.no_grad()
def extract_features(feature_fn: FeatureFn, pixels: Tensor, batch_size: int = 256,
                     device: torch.device | None = None) -> Tensor:
    """`feature_fn(pixels)` (B, D) over `pixels` (N, 1, H, W) in batches, on `device`, returned on the CPU."""
    chunks = [feature_fn(pixels[i:i + batch_size].to(device) if device else pixels[i:i + batch_size]).flatten(1)
              for i in range(0, len(pixels), batch_size)]
    return torch.cat(chunks).float().cpu()


def network_features(network: nn.Module) -> FeatureFn:
    """The frozen network's `features` method in eval mode (a GlyphCNN), or its plain call for other modules."""
    network.eval()
    return getattr(network, "features", network)


def fd_cnn(generated: Tensor, real: Tensor, network: nn.Module | FeatureFn | None = None) -> float:
    """FD-CNN: the Fréchet distance between the features of `generated` and `real` images (N, 1, 16, 16) in
    [0, 1]. `network`: a module with `features(pixels) -> (B, D)` or a function; default the pretrained GlyphCNN."""
    if network is None:
        network = default_feature_network()
    feature_fn = network_features(network) if isinstance(network, nn.Module) else network
    device = next(network.parameters()).device if isinstance(network, nn.Module) else None
    return frechet_distance(extract_features(feature_fn, generated, device=device),
                            extract_features(feature_fn, real, device=device))


def default_feature_network() -> nn.Module:
    """The frozen pretrained GlyphCNN (features(pixels) -> (B, D)), shipped by the vision backbones."""
    from deltatune.data.vision import load_glyph_cnn

    return load_glyph_cnn().eval().requires_grad_(False)

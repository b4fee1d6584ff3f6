"""Calibration of a classifier: expected calibration error (ECE) and the reliability diagram's bins.

Predictions are binned by confidence (the top softmax probability) into `bins` equal-width bins of (0, 1] (a
confidence c falls in bin b when b/bins < c <= (b+1)/bins, as in the PS-KD code's `metric_ece_aurc_eaurc`);
ECE = Σ_b (n_b / n)·|accuracy_b − confidence_b|, reported as a fraction (the PS-KD paper prints it ×100).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import ConfigError


@dataclass(frozen=True)
class ReliabilityBins:
    """Per bin: the upper edge, the number of predictions, their mean confidence and their accuracy (0 when
    empty)."""

    upper: Tensor
    count: Tensor
    confidence: Tensor
    accuracy: Tensor

    @property
    def ece(self) -> float:
        total = float(self.count.sum())
        return float((self.count * (self.accuracy - self.confidence).abs()).sum() / total) if total else 0.0


def reliability_bins(probabilities: Tensor, labels: Tensor, bins: int = 15) -> ReliabilityBins:
    """Bin (N, C) class probabilities with their (N,) labels by confidence (see the module docstring)."""
    if not (isinstance(bins, int) and bins >= 1):
        raise ConfigError(f"bins={bins!r} is invalid: expected an integer >= 1 (15 is the usual choice)")
    if probabilities.dim() != 2 or labels.shape != probabilities.shape[:1]:
        raise ConfigError(f"probabilities {tuple(probabilities.shape)} and labels {tuple(labels.shape)} do not "
                          "fit: expected (N, C) class probabilities and (N,) class indices")
    confidence, predicted = probabilities.double().max(dim=1)
    correct = (predicted == labels.to(predicted.device)).double()
    # ceil(c·bins) − 1 puts c in the bin whose upper edge is the first >= c (right-closed bins).
    which = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, which.cpu(), torch.ones_like(confidence).cpu())
    confidence_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which.cpu(), confidence.cpu())
    correct_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which.cpu(), correct.cpu())
    safe = count.clamp(min=1)
    return ReliabilityBins(torch.arange(1, bins + 1, dtype=torch.float64) / bins, count, confidence_sum / safe,
                           correct_sum / safe)


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE of (N, C) class probabilities against (N,) labels, as a fraction in [0, 1]."""
    return reliability_bins(probabilities, labels, bins).ece

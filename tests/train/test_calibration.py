"""ECE and reliability bins, checked against numbers worked out by hand."""
from __future__ import annotations

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.train.calibration import expected_calibration_error, reliability_bins


def test_ece_by_hand_with_two_bins() -> None:
    # Top confidences 0.9, 0.8, 0.6, 0.55: with 2 bins all four fall in (0.5, 1].
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = torch.tensor([0, 0, 0, 1])  # correct, wrong, correct, correct
    bins = reliability_bins(probabilities, labels, bins=2)
    assert bins.count.tolist() == [0.0, 4.0]
    assert bins.confidence[1].item() == pytest.approx((0.9 + 0.8 + 0.6 + 0.55) / 4)
    assert bins.accuracy[1].item() == pytest.approx(0.75)
    assert expected_calibration_error(probabilities, labels, bins=2) == pytest.approx(abs(0.75 - 0.7125))


def test_ece_weights_bins_by_their_share() -> None:
    # 3 bins of width 1/3: top confidence 0.3 (wrong) in bin 0, 0.5 (right) in bin 1, 0.9 and 1.0 (right) in bin 2.
    probabilities = torch.tensor([[0.3, 0.25, 0.25, 0.2], [0.5, 0.25, 0.25, 0.0], [0.9, 0.05, 0.05, 0.0],
                                  [1.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 0])
    expected = (1 * abs(0 - 0.3) + 1 * abs(1 - 0.5) + 2 * abs(1 - 0.95)) / 4
    assert expected_calibration_error(probabilities, labels, bins=3) == pytest.approx(expected)
    edge = torch.tensor([[0.5, 0.5], [0.75, 0.25]])  # on an edge: the lower bin (bins are right-closed)
    assert reliability_bins(edge, torch.tensor([0, 0]), bins=4).count.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="bins=0 is invalid"):
        reliability_bins(torch.ones(2, 2) / 2, torch.zeros(2, dtype=torch.long), bins=0)
    with pytest.raises(ConfigError, match="do not fit"):
        reliability_bins(torch.ones(2, 2) / 2, torch.zeros(3, dtype=torch.long))

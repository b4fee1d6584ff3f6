"""The prunability sweep (deltatune.train.prunability): regime labels, calibrated thresholds, advice, the driver."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import ConfigError, TrainingError
from deltatune.train.prunability import (
    SweepCell,
    label_regimes,
    largest_gap_threshold,
    measure_density,
    prunability_sweep,
    recommend,
)
from deltatune.train.pruning import PrunedWeights


def _cell(temperature: float, density: float, barrier: float, cka: float) -> SweepCell:
    return SweepCell(temperature, density, (0.1, 0.1), (barrier,), (cka,), ((0.0, 0.0, 0.0),), 10, 0.05)


def test_largest_gap_threshold_is_the_midpoint_of_the_widest_gap() -> None:
    assert largest_gap_threshold([0.0, 0.01, 0.02, 0.30, 0.31]) == pytest.approx(0.16)
    assert largest_gap_threshold([0.5, 0.5]) is None


def test_regimes_from_calibrated_thresholds() -> None:
    cells = [_cell(0.0, 0.05, -0.20, 0.90),   # a hump of 0.20 -> I
             _cell(0.1, 0.05, -0.15, 0.95),   # 0.15 -> I
             _cell(0.2, 0.05, -0.001, 0.97),  # connected, CKA low -> II-A
             _cell(0.0, 0.5, 0.0, 0.999),     # connected, CKA high -> II-B
             _cell(0.1, 0.5, 0.0, 0.998)]
    regimes = label_regimes(cells)
    # humps sorted 0, 0.001, 0.15, 0.2: the widest gap is 0.001..0.15
    assert regimes.hump_threshold == pytest.approx(0.0755)
    # CKA of the connected cells 0.97, 0.998, 0.999: the widest gap is 0.97..0.998
    assert regimes.cka_threshold == pytest.approx(0.984)
    assert [regimes.regimes[(c.temperature, c.density)] for c in cells] == ["I", "I", "II-A", "II-B", "II-B"]
    assert [regimes.advice(c.temperature, c.density) for c in cells] == ["raise", "raise", "lower", "keep", "keep"]


def test_small_humps_are_connected_and_explicit_thresholds_win() -> None:
    cells = [_cell(0.0, 0.5, -0.004, 0.99), _cell(0.1, 0.5, 0.0, 0.999)]
    assert label_regimes(cells).hump_threshold == pytest.approx(0.01)  # the floor: no regime I at all
    assert set(label_regimes(cells).regimes.values()) == {"II-A", "II-B"}
    forced = label_regimes(cells, hump_threshold=0.001, cka_threshold=0.5)
    assert forced.regimes == {(0.0, 0.5): "I", (0.1, 0.5): "II-B"}


def test_one_connected_cell_is_not_split() -> None:
    regimes = label_regimes([_cell(0.0, 0.05, -0.3, 0.9), _cell(0.1, 0.05, 0.0, 0.99)])
    assert regimes.cka_threshold is None and regimes.regimes[(0.1, 0.05)] == "II"
    assert recommend("II") == "keep"
    with pytest.raises(ConfigError, match="regime"):
        recommend("III")


class _ToyTask:
    """Two-blob classification with a tiny conv net; `bypass=True` retrains without keeping the masks."""

    norm_inputs = None

    def __init__(self, bypass: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (64,), generator=generator)
        self.x = torch.randn(64, 1, 4, 4, generator=generator) + (2.0 * self.y - 1.0)[:, None, None, None]
        self.bypass = bypass
        self.temperatures_seen: list[float] = []

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))

    def _fit(self, model: nn.Module, seed: int, steps: int = 15) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            batch = torch.randperm(64, generator=generator)[:16]
            optimizer.zero_grad()
            F.cross_entropy(model(self.x[batch]), self.y[batch]).backward()
            optimizer.step()

    def dense_train(self, model: nn.Module, temperature: float, seed: int) -> None:
        self.temperatures_seen.append(temperature)
        self._fit(model, seed)

    def retrain(self, model: nn.Module, pruned: PrunedWeights, seed: int) -> None:
        if self.bypass:
            pruned.detach()
            with torch.no_grad():
                model[0].weight.add_(0.01)
        self._fit(model, 100 + seed)

    @torch.no_grad()
    def _error(self, model: nn.Module) -> float:
        return float((model(self.x).argmax(1) != self.y).float().mean())

    def train_error(self, model: nn.Module) -> float:
        return self._error(model)

    def test_error(self, model: nn.Module) -> float:
        return self._error(model)

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> Tensor:
        return model(self.x).softmax(1)


def test_sweep_visits_every_cell_and_keeps_the_density() -> None:
    task = _ToyTask()
    seen = []
    cells = prunability_sweep(task, [0.0, 0.5], [0.5, 0.25], retrain_seeds=(0, 1, 2), on_cell=seen.append)
    assert [(c.temperature, c.density) for c in cells] == [(0.0, 0.5), (0.0, 0.25), (0.5, 0.5), (0.5, 0.25)]
    assert seen == cells and task.temperatures_seen == [0.0, 0.5]
    for cell in cells:
        assert len(cell.test_errors) == 3 and len(cell.barriers) == len(cell.ckas) == 3  # 3 pairs
        assert cell.kept == int(36 * cell.density)  # the conv's 4·1·3·3 weights
        assert all(len(curve) == 11 for curve in cell.curves)
        assert all(0.0 < cka <= 1.0 + 1e-9 for cka in cell.ckas)


def test_a_retraining_that_loses_the_masks_is_refused() -> None:
    task = _ToyTask(bypass=True)
    dense = task.build_model(0)
    with pytest.raises(TrainingError, match="no longer zero"):
        measure_density(task, dense, 0.0, 0.25)


def test_one_retrain_seed_is_refused() -> None:
    task = _ToyTask()
    with pytest.raises(ConfigError, match="at least 2 distinct seeds"):
        measure_density(task, task.build_model(0), 0.0, 0.5, retrain_seeds=(0,))

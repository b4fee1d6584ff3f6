"""The prunability sweep of the three-regime model of pruning (Zhou, Yang, Chang, Mahoney, ICML 2023; code
`YefanZhou/ThreeRegimePruning`; our notes: shared/methods/other.md §11).

Two control parameters: a *temperature* of the dense training (SAM's ρ, the number of epochs, the batch size)
and a *load*, the density kept by pruning. For every temperature the dense model is trained once, then for every
density it is magnitude-pruned (`deltatune.train.pruning`), retrained from the pruned weights (not
re-initialised) with each retrain seed, and measured (`deltatune.train.landscape`):

- the test error of each retrained model (the quantity the advice is about);
- the LMC barrier between each pair of retrained models on the training error (negative = a hump);
- linear CKA of each pair's softmax outputs on training inputs;

averaged over the pairs. `label_regimes` then reads the regime of each cell — **I** poorly connected (a hump
larger than the barrier threshold), **II-A** connected with dissimilar outputs (CKA below the CKA threshold),
**II-B** connected and similar — and `recommend` gives the paper's advice for a fixed density: raise the
temperature in I (I → II-A), lower it in II-A (II-A → II-B), keep it in II-B.

Thresholds [ours]: the paper's are read off its plots and depend on the data set, so by default they are
calibrated on the grid (the notes' "barrier ≈ 0 ⇒ II, then split II by CKA"): each is the midpoint of the
largest gap between consecutive sorted values (a two-cluster split in one dimension); the hump threshold is at
least `min_hump` (0.01 = 1% training error), so a grid whose cells are all connected is all regime II. With fewer
than two connected cells II is not split (label "II", advice "keep"). Pass explicit thresholds to override.

The caller supplies the training through a `PrunabilityTask` (six methods and `norm_inputs`; `dense_train` reads
the temperature, `retrain` gets the `PrunedWeights` whose masks it must keep: the sweep checks them afterwards).
"""
from __future__ import annotations

import copy
import itertools
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.train.landscape import DEFAULT_POINTS, ModelInput, linear_cka, lmc_barrier
from deltatune.train.pruning import DEFAULT_LAYER_TYPES, PrunedWeights, magnitude_masks

REGIMES = ("I", "II-A", "II-B", "II")
ADVICE = {"I": "raise", "II-A": "lower", "II-B": "keep", "II": "keep"}
MIN_HUMP = 0.01  # ours: a hump below 1% training error counts as connected


class PrunabilityTask(Protocol):
    """What the sweep needs from a model and its data (see `benchmarks/three_regime.py` for one on digits)."""

    norm_inputs: Iterable[ModelInput] | None  # training batches to re-estimate BatchNorm (None: no BatchNorm)

    def build_model(self, seed: int) -> nn.Module: ...

    def dense_train(self, model: nn.Module, temperature: float, seed: int) -> None: ...

    def retrain(self, model: nn.Module, pruned: PrunedWeights, seed: int) -> None: ...

    def train_error(self, model: nn.Module) -> float: ...

    def test_error(self, model: nn.Module) -> float: ...

    def outputs(self, model: nn.Module) -> Tensor: ...


@dataclass(frozen=True)
class SweepCell:
    """One (temperature, density) point: the retrained models' test errors and the pairs' landscape metrics."""

    temperature: float
    density: float
    test_errors: tuple[float, ...]
    barriers: tuple[float, ...]
    ckas: tuple[float, ...]
    curves: tuple[tuple[float, ...], ...]
    kept: int
    dense_test_error: float

    @property
    def test_error(self) -> float:
        return statistics.mean(self.test_errors)

    @property
    def barrier(self) -> float:
        return statistics.mean(self.barriers)

    @property
    def cka(self) -> float:
        return statistics.mean(self.ckas)


def measure_density(task: PrunabilityTask, dense: nn.Module, temperature: float, density: float, *,
                    retrain_seeds: Sequence[int] = (0, 1), scope: str = "uniform",
                    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES, points: int = DEFAULT_POINTS,
                    dense_test_error: float | None = None) -> SweepCell:
    """Prune a copy of the trained `dense` model at `density`, retrain it once per seed, measure the cell."""
    if len(retrain_seeds) < 2 or len(set(retrain_seeds)) != len(retrain_seeds):
        raise ConfigError(f"retrain_seeds={tuple(retrain_seeds)} is invalid: expected at least 2 distinct seeds "
                          "(the barrier and CKA compare retrained pairs; the code uses 3)")
    masks = magnitude_masks(dense, density, scope=scope, layer_types=layer_types)
    retrained = []
    for seed in retrain_seeds:
        model = copy.deepcopy(dense)  # the dense model stays as trained for the next density
        pruned = PrunedWeights(model, masks).attach()
        task.retrain(model, pruned, seed)
        pruned.detach()
        pruned.check()
        retrained.append(model)
    barriers, ckas, curves = [], [], []
    for model_a, model_b in itertools.combinations(retrained, 2):
        curve = lmc_barrier(model_a, model_b, task.train_error, points, norm_inputs=task.norm_inputs)
        barriers.append(curve.barrier)
        curves.append(curve.errors)
        ckas.append(linear_cka(task.outputs(model_a), task.outputs(model_b)))
    return SweepCell(float(temperature), float(density), tuple(task.test_error(m) for m in retrained),
                     tuple(barriers), tuple(ckas), tuple(curves), pruned.kept(),
                     task.test_error(dense) if dense_test_error is None else dense_test_error)


def prunability_sweep(task: PrunabilityTask, temperatures: Sequence[float], densities: Sequence[float], *,
                      model_seed: int = 0, retrain_seeds: Sequence[int] = (0, 1), scope: str = "uniform",
                      layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES, points: int = DEFAULT_POINTS,
                      on_cell: Callable[[SweepCell], None] | None = None) -> list[SweepCell]:
    """Dense training per temperature → prune at each density → retrain per seed → barrier, CKA, test error.

    Temperatures are given in the order of increasing temperature (the caller's convention: larger SAM ρ or
    smaller batch is hotter). `on_cell` sees each cell as it is measured (to log it)."""
    if not temperatures or not densities:
        raise ConfigError("a sweep needs at least one temperature and one density")
    cells = []
    for temperature in temperatures:
        torch.manual_seed(model_seed)
        dense = task.build_model(model_seed)
        task.dense_train(dense, temperature, model_seed)
        dense_error = task.test_error(dense)
        for density in densities:
            cell = measure_density(task, dense, temperature, density, retrain_seeds=retrain_seeds, scope=scope,
                                   layer_types=layer_types, points=points, dense_test_error=dense_error)
            if on_cell is not None:
                on_cell(cell)
            cells.append(cell)
    return cells


def largest_gap_threshold(values: Sequence[float]) -> float | None:
    """The midpoint of the largest gap between consecutive sorted values (None for fewer than 2 distinct)."""
    ordered = sorted(set(float(v) for v in values))
    if len(ordered) < 2:
        return None
    gaps = [(high - low, low, high) for low, high in zip(ordered, ordered[1:])]
    _, low, high = max(gaps)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class RegimeMap:
    """The regime and the advice of each (temperature, density), with the thresholds used."""

    hump_threshold: float
    cka_threshold: float | None
    regimes: dict[tuple[float, float], str] = field(default_factory=dict)

    def advice(self, temperature: float, density: float) -> str:
        return recommend(self.regimes[(temperature, density)])


def label_regimes(cells: Sequence[SweepCell], *, hump_threshold: float | None = None,
                  cka_threshold: float | None = None, min_hump: float = MIN_HUMP) -> RegimeMap:
    """Regime I where the hump −barrier exceeds `hump_threshold`, else II-A / II-B by CKA below / at or above
    `cka_threshold`; missing thresholds are calibrated on the cells (module docstring)."""
    if not cells:
        raise ConfigError("no sweep cells to label; run prunability_sweep first")
    humps = [-cell.barrier for cell in cells]
    if hump_threshold is None:
        gap = largest_gap_threshold(humps)
        hump_threshold = max(min_hump, gap if gap is not None else min_hump)
    connected = [cell for cell, hump in zip(cells, humps) if hump <= hump_threshold]
    if cka_threshold is None:
        cka_threshold = largest_gap_threshold([cell.cka for cell in connected])
    regimes = {}
    for cell, hump in zip(cells, humps):
        key = (cell.temperature, cell.density)
        if hump > hump_threshold:
            regimes[key] = "I"
        elif cka_threshold is None:
            regimes[key] = "II"
        else:
            regimes[key] = "II-B" if cell.cka >= cka_threshold else "II-A"
    return RegimeMap(float(hump_threshold), cka_threshold, regimes)


def recommend(regime: str) -> str:
    """The paper's advice for a fixed density: "raise" the temperature in I, "lower" it in II-A, "keep" in II-B."""
    if regime not in ADVICE:
        raise ConfigError(f"regime={regime!r} is invalid: expected one of {REGIMES}")
    return ADVICE[regime]

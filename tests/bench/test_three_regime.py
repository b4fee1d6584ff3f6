"""benchmarks/three_regime.py's second protocol: the epochs knob's checkpoints of one dense run, the retraining
warm-up, the knob's temperature order and the refusals (tiny nets on digits, seconds)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from deltatune.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "three_regime.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("three_regime_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def settings(**changes) -> argparse.Namespace:
    base = dict(knob="epochs", rhos=[0.0, 0.4], dense_epochs=[1, 3], densities=[0.5], seeds=[0], epochs=3,
                channels=[2, 2, 2, 2], batch_size=256, lr=0.1, retrain_lr=0.05, retrain_epochs=2, warmup=0,
                weight_decay=1e-4, task="digits")
    return argparse.Namespace(**{**base, **changes})


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_checkpoint_is_the_full_dense_run_and_earlier_ones_are_kept_apart(bench):
    task = bench.DigitsSweep(settings())
    model = task.build_model(0)
    states = task.dense_checkpoints(model, seed=0)
    assert sorted(states) == [1, 3]
    full = task.build_model(0)
    task.dense_train(full, 0.0, 0)  # plain SGD for --epochs 3 = max(--dense-epochs): the same run
    assert same_state(states[3], full.state_dict())
    assert not same_state(states[1], states[3])
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert same_state(states[3], full.state_dict())  # a copy, not the live model's tensors


def test_the_warm_up_ramps_the_rate_per_step_then_the_step_schedule_takes_over(bench, monkeypatch):
    task = bench.DigitsSweep(settings(batch_size=512))  # 1,259 images: 3 steps an epoch
    seen = []
    step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    task._train(task.build_model(0), rho=0.0, seed=0, lr=0.3, epochs=4, warmup=2)
    expected = [0.3 * k / 6 for k in range(1, 7)] + [0.3 * 0.1] * 3 + [0.3 * 0.01] * 3  # steps at epochs 2 and 3
    assert seen == pytest.approx(expected, rel=1e-12)


def test_one_dense_run_per_seed_serves_every_epoch_count(bench, monkeypatch):
    task = bench.DigitsSweep(settings(densities=[0.5]))
    calls = []
    real = task.dense_checkpoints
    monkeypatch.setattr(task, "dense_checkpoints", lambda model, seed: calls.append(seed) or real(model, seed))
    runner = bench.EpochCheckpoints(task, settings())
    records = [runner({"seed": seed, "epochs": epochs}) for seed, epochs in [(0, 3), (0, 1), (1, 3)]]
    assert calls == [0, 1]
    assert [r["epochs"] for r in records] == [3, 1, 3]
    assert all(len(r["cells"]) == 1 and len(r["cells"][0]["test_errors"]) == 2 for r in records)


def test_fewer_epochs_is_hotter_and_a_partial_seed_is_left_out(bench):
    chosen = settings(dense_epochs=[10, 5, 40], seeds=[0, 1])
    assert bench.temperatures(chosen) == [40, 10, 5]
    assert bench.temperatures(settings(knob="rho", rhos=[0.4, 0.0])) == [0.0, 0.4]
    records = [{"seed": 0, "epochs": e} for e in (40, 10, 5)] + [{"seed": 1, "epochs": 40}]
    assert [r["seed"] for r in bench.complete_seeds(records, chosen)] == [0, 0, 0]


@pytest.mark.parametrize("changes, named", [({"dense_epochs": [10, 10]}, "--dense-epochs"),
                                            ({"warmup": 3}, "--warmup")])
def test_settings_the_study_cannot_run_are_refused(bench, changes, named):
    with pytest.raises(ConfigError, match=named):
        bench.check_settings(settings(**changes))

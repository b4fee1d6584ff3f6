"""Callbacks fire in the documented order with the documented step numbers."""
from __future__ import annotations

import pytest
import torch

from deltatune.train import Callback, TrainConfig, Trainer, lr_multiplier
from train.trainer_toys import BlobDataset, small_net


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.checks: list[str] = []

    def on_train_begin(self, global_step, epoch, **_):
        self.events.append(("train_begin", global_step, epoch))

    def on_step_begin(self, global_step, epoch, **_):
        self.events.append(("step_begin", global_step, epoch))

    def on_backward_end(self, global_step, model, **_):
        self.events.append(("backward_end", global_step))
        if any(p.grad is None for p in model.parameters() if p.requires_grad):
            self.checks.append(f"missing gradient at step {global_step}")
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, progress, global_step, model, optimizer, **_):
        self.events.append(("step_end", global_step))
        unchanged = all(torch.equal(p, self.before[n]) for n, p in model.named_parameters())
        if unchanged and global_step > 1:  # the first step runs at lr 0 (warm-up starts from 0)
            self.checks.append(f"no update before on_step_end at step {global_step}")
        expected_lr = 0.1 * lr_multiplier("linear", progress.total_steps, 1)(global_step)
        if optimizer.param_groups[0]["lr"] != pytest.approx(expected_lr):
            self.checks.append(f"scheduler not stepped before on_step_end at step {global_step}")

    def on_epoch_end(self, global_step, epoch, **_):
        self.events.append(("epoch_end", global_step, epoch))

    def on_evaluate(self, global_step, metrics, **_):
        self.events.append(("evaluate", global_step, sorted(metrics)))

    def on_train_end(self, global_step, epoch, progress, **_):
        self.events.append(("train_end", global_step, epoch, progress.last_checkpoint.name))


def steps(step):
    return [("step_begin", step, step // 2), ("backward_end", step), ("step_end", step + 1)]


def test_hooks_fire_in_order_with_step_numbers(tmp_path):
    recorder = Recorder()
    config = TrainConfig(epochs=2, batch_size=5, lr=0.1, warmup_steps=1, output_dir=str(tmp_path), progress=False)
    Trainer(small_net(), config, BlobDataset(n=10), BlobDataset(n=6, seed=1), callbacks=[recorder]).train()
    evaluate = ["accuracy", "loss"]
    assert recorder.events == [
        ("train_begin", 0, 0),
        *steps(0), *steps(1), ("evaluate", 2, evaluate), ("epoch_end", 2, 0),
        *steps(2), *steps(3), ("evaluate", 4, evaluate), ("epoch_end", 4, 1),
        ("train_end", 4, 2, "step-000004"),
    ]
    assert recorder.checks == []


def test_duck_typed_callbacks_with_only_the_arguments_they_read():
    seen = []

    class Minimal:  # no base class, no state: like a method's schedule object
        def on_step_begin(self, global_step, **_):
            seen.append(global_step)

    Trainer(small_net(), TrainConfig(max_steps=3, batch_size=5, progress=False), BlobDataset(n=10),
            callbacks=[Minimal()]).train()
    assert seen == [0, 1, 2]


def test_request_stop_ends_after_the_current_step_with_a_final_evaluation():
    class StopAfterTwo(Callback):
        def on_step_end(self, progress, global_step, **_):
            if global_step == 2:
                progress.request_stop()

    result = Trainer(small_net(), TrainConfig(epochs=5, batch_size=4, progress=False), BlobDataset(n=20),
                     BlobDataset(n=6, seed=1), callbacks=[StopAfterTwo()]).train()
    assert result.global_step == 2 and result.stopped_early
    assert {"train_loss", "eval_loss", "eval_accuracy"} <= set(result.metrics)
    assert result.history[-1]["step"] == 2 and "eval_accuracy" in result.history[-1]

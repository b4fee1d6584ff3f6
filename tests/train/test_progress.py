"""TrainingProgress: the trainer's state as one object (state_dict round trip, the trainer's state_dict, what
callbacks see, the checkpoint format it must keep)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import TrainingError
from deltatune.train import Callback, TrainConfig, Trainer
from deltatune.train.checkpoint import STATE_FILE, checkpoints_root, latest_checkpoint
from deltatune.train.progress import STATE_KEYS, TrainingProgress
from train.test_resume import RandomDecisions, assert_identical, optimizer_tensors
from train.trainer_toys import BlobDataset, small_net, trainable_snapshot

counts = st.integers(min_value=0, max_value=10**9)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def progresses(draw) -> TrainingProgress:
    progress = TrainingProgress(total_steps=draw(counts), steps_per_epoch=draw(st.integers(1, 10**6)),
                                global_step=draw(counts), epoch=draw(counts), batch_in_epoch=draw(counts),
                                last_eval_step=draw(st.none() | counts))
    interval = progress.interval
    interval.loss, interval.steps, interval.samples = draw(finite), draw(counts), draw(counts)
    interval.seconds, interval.lr, interval.grad_norm = draw(finite), draw(finite), draw(st.none() | finite)
    return progress


@settings(max_examples=200, deadline=None)
@given(progresses())
def test_progress_round_trips_through_a_json_state_dict(progress):
    state = json.loads(json.dumps(progress.state_dict()))  # what trainer_state.json keeps
    assert set(state) == set(STATE_KEYS)
    restored = TrainingProgress(total_steps=progress.total_steps, steps_per_epoch=progress.steps_per_epoch)
    restored.load_state_dict(state)
    assert restored.state_dict() == progress.state_dict()
    assert (restored.global_step, restored.epoch, restored.batch_in_epoch, restored.last_eval_step) == (
        progress.global_step, progress.epoch, progress.batch_in_epoch, progress.last_eval_step)
    assert vars(restored.interval) == vars(progress.interval)


def test_a_state_without_the_later_keys_loads_with_their_defaults():
    """Checkpoints written before the last evaluated step and the log sums were kept."""
    progress = TrainingProgress(total_steps=12, steps_per_epoch=4, last_eval_step=3)
    progress.interval.add(1.5, 8, 0.1, 1e-3, None)
    progress.load_state_dict({"global_step": 6, "epoch": 1, "batch_in_epoch": 2})
    assert (progress.global_step, progress.epoch, progress.batch_in_epoch) == (6, 1, 2)
    assert progress.last_eval_step is None and progress.interval.steps == 0


def test_a_state_without_the_step_is_refused():
    with pytest.raises(TrainingError, match="no 'global_step'"):
        TrainingProgress(total_steps=12, steps_per_epoch=4).load_state_dict({"epoch": 1, "batch_in_epoch": 2})


def test_the_loop_advances_the_progress_it_exposes():
    trainer = Trainer(small_net(), TrainConfig(epochs=2, batch_size=8, progress=False), BlobDataset(n=30),
                      BlobDataset(n=6, seed=1))
    assert (trainer.progress.total_steps, trainer.progress.steps_per_epoch) == (8, 4)
    trainer.train()
    progress = trainer.progress
    assert (progress.global_step, progress.epoch, progress.batch_in_epoch) == (8, 2, 0)
    assert progress.last_eval_step == 8 and set(progress.last_eval_metrics) == {"loss", "accuracy"}
    assert (trainer.global_step, trainer.epoch, trainer.total_steps) == (8, 2, 8)


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, progress, global_step, **_):
        if global_step == self.step:
            progress.request_stop()


def run(*, callbacks=(), state=None, dropout=0.0, output_dir=None, resume=False):
    config = TrainConfig(epochs=3, batch_size=8, lr=0.02, warmup_ratio=0.2, schedule="cosine", progress=False,
                         output_dir=None if output_dir is None else str(output_dir), resume=resume)
    trainer = Trainer(small_net(dropout=dropout), config, BlobDataset(n=30), callbacks=list(callbacks))
    if state is not None:
        trainer.load_state_dict(state)
    trainer.train()
    return trainer


def test_a_trainer_loaded_from_another_trainers_state_dict_continues_it_exactly():
    """In memory, no files: stop at step 6 (mid-epoch), hand the state to a new Trainer, which ends where an
    uninterrupted run ends (parameters, optimizer, scheduler, callback decisions). No dropout: the process RNG
    is not part of the trainer's state."""
    straight_decisions, first_decisions, second_decisions = RandomDecisions(), RandomDecisions(), RandomDecisions()
    straight = run(callbacks=[straight_decisions])
    first = run(callbacks=[first_decisions, StopAt(6)])
    state = first.state_dict()
    assert state["progress"]["global_step"] == 6 and state["progress"]["batch_in_epoch"] == 2
    second = run(callbacks=[second_decisions], state=state)
    assert second.global_step == 12
    assert_identical(trainable_snapshot(second.model), trainable_snapshot(straight.model))
    assert_identical(optimizer_tensors(second), optimizer_tensors(straight))
    assert second.scheduler.state_dict()["_last_lr"] == straight.scheduler.state_dict()["_last_lr"]
    assert second_decisions.choices == straight_decisions.choices


def test_load_state_dict_refuses_other_callbacks():
    state = run(callbacks=[StopAt(2)]).state_dict()
    with pytest.raises(TrainingError, match="the trainer state holds callback states \\[\\] but the trainer has "
                                            "\\['0:RandomDecisions'\\]"):
        Trainer(small_net(), TrainConfig(max_steps=4, batch_size=8, progress=False), BlobDataset(n=30),
                callbacks=[RandomDecisions()]).load_state_dict(state)


class ProgressReader(Callback):
    """Records what each hook sees in `progress`, and whether it was handed the trainer."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def record(self, hook, progress, **kwargs):
        self.seen.append((hook, progress.global_step, progress.epoch, progress.batch_in_epoch,
                          progress.total_steps, progress.last_eval_step,
                          progress.last_checkpoint and progress.last_checkpoint.name, "trainer" in kwargs))
        self.progress = progress

    def on_step_end(self, **kwargs):
        self.record("step_end", **kwargs)

    def on_evaluate(self, metrics, **kwargs):
        self.record("evaluate", **kwargs)

    def on_train_end(self, **kwargs):
        self.record("train_end", **kwargs)


def test_callbacks_see_the_progress_and_not_the_trainer(tmp_path):
    reader = ProgressReader()
    config = TrainConfig(epochs=2, batch_size=5, checkpoint_every=3, output_dir=str(tmp_path), progress=False)
    trainer = Trainer(small_net(), config, BlobDataset(n=10), BlobDataset(n=6, seed=1), callbacks=[reader])
    trainer.train()
    assert reader.progress is trainer.progress
    assert reader.seen == [
        ("step_end", 1, 0, 0, 4, None, None, False),  # batch_in_epoch counts after on_step_end
        ("step_end", 2, 0, 1, 4, None, None, False),
        ("evaluate", 2, 0, 2, 4, 2, None, False),
        ("step_end", 3, 1, 0, 4, 2, None, False),
        ("step_end", 4, 1, 1, 4, 2, "step-000003", False),
        ("evaluate", 4, 1, 2, 4, 4, "step-000003", False),
        ("train_end", 4, 2, 0, 4, 4, "step-000004", False),
    ]


def test_a_hook_that_names_trainer_still_gets_it():
    """The callback API before `progress`: such callbacks keep working unchanged."""
    got = []

    class OldStyle:
        def on_step_end(self, trainer, global_step, **_):
            got.append((trainer, global_step))
            if global_step == 2:
                trainer.request_stop()

    trainer = Trainer(small_net(), TrainConfig(max_steps=5, batch_size=8, progress=False), BlobDataset(n=30),
                      callbacks=[OldStyle()])
    result = trainer.train()
    assert result.global_step == 2 and result.stopped_early
    assert got == [(trainer, 1), (trainer, 2)]


# The top-level keys of trainer_state.json, format version 1: checkpoints written before TrainingProgress have
# exactly these, and new ones must too (or FORMAT_VERSION must change and old ones be refused).
FORMAT_1_KEYS = {"format_version", "global_step", "epoch", "batch_in_epoch", "permutation_seed", "num_examples",
                 "world_size", "last_eval_step", "config", "callbacks", "interval", "rng"}


def test_the_checkpoint_keeps_its_format(tmp_path):
    run(callbacks=[StopAt(6)], output_dir=tmp_path)
    state = json.loads((latest_checkpoint(checkpoints_root(tmp_path)) / STATE_FILE).read_text())
    assert set(state) == FORMAT_1_KEYS and state["format_version"] == 1
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 2)


def test_a_checkpoint_from_before_the_log_sums_still_resumes_exactly(tmp_path):
    straight = run(dropout=0.3)
    run(callbacks=[StopAt(6)], dropout=0.3, output_dir=tmp_path)
    state_file: Path = latest_checkpoint(checkpoints_root(tmp_path)) / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["interval"]
    state_file.write_text(json.dumps(state))
    resumed = run(dropout=0.3, output_dir=tmp_path, resume=True)
    assert resumed.global_step == 12
    assert_identical(trainable_snapshot(resumed.model), trainable_snapshot(straight.model))
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())

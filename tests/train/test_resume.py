"""Resuming continues exactly: train N steps == train k steps, stop (or crash), resume, train N - k steps."""
from __future__ import annotations

import json
import random

import pytest
import torch

from deltatune.errors import TrainingError
from deltatune.train import Callback, TrainConfig, Trainer, list_checkpoints
from deltatune.train.checkpoint import checkpoints_root
from train.trainer_toys import BlobDataset, small_net, trainable_snapshot


class StopAt:
    """Not stateful (no state_dict), so runs with and without it resume into each other."""

    def __init__(self, step: int, crash: bool = False) -> None:
        self.step, self.crash = step, crash

    def on_step_end(self, progress, global_step, **_):
        if global_step == self.step:
            if self.crash:
                raise RuntimeError("simulated crash")
            progress.request_stop()


class RandomDecisions(Callback):
    """Stands in for an allocator: decisions drawn from its own RNG, a tensor mask, an int-keyed dict."""

    def __init__(self) -> None:
        self.rng = random.Random(7)
        self.choices: list[int] = []
        self.mask = torch.zeros(5, dtype=torch.bool)
        self.ranks: dict[int, int] = {}

    def on_step_begin(self, global_step, **_):
        choice = self.rng.randrange(5)
        self.choices.append(choice)
        self.mask[choice] = True
        self.ranks[global_step] = choice

    def state_dict(self):
        return {"rng": self.rng.getstate(), "choices": self.choices, "mask": self.mask, "ranks": self.ranks}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])
        self.choices, self.mask, self.ranks = list(state["choices"]), state["mask"].clone(), dict(state["ranks"])


def train(tmp, *, dropout: float, extra=(), resume: bool = False, build=small_net, **overrides):
    model = build(dropout=dropout)
    decisions = RandomDecisions()
    settings = dict(epochs=3, batch_size=8, lr=0.02, warmup_ratio=0.2, schedule="cosine", checkpoint_every=5,
                    log_every=1, output_dir=str(tmp), resume=resume, progress=False)
    config = TrainConfig(**{**settings, **overrides})
    trainer = Trainer(model, config, BlobDataset(n=30), BlobDataset(n=12, seed=1),
                      callbacks=[decisions, *extra])
    result = trainer.train()
    return trainer, decisions, result


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def optimizer_tensors(trainer):
    return {f"{i}.{k}": v for i, s in trainer.optimizer.state_dict()["state"].items() for k, v in s.items()}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("crash", [False, True])
def test_stop_or_crash_then_resume_equals_an_uninterrupted_run(tmp_path, dropout, crash):
    straight, straight_decisions, result = train(tmp_path / "straight", dropout=dropout)
    assert result.global_step == 12  # 3 epochs x ceil(30 / 8)
    # Step 6 is mid-epoch (epoch 1, batch 2). A stop writes a final checkpoint at 6; a crash at 7 falls back
    # to the checkpoint of step 5 and replays steps 6 and 7.
    interrupted = tmp_path / "interrupted"
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(interrupted, dropout=dropout, extra=[StopAt(7, crash=True)])
    else:
        _, _, first = train(interrupted, dropout=dropout, extra=[StopAt(6)])
        assert first.stopped_early and first.global_step == 6
    resumed, resumed_decisions, second = train(interrupted, dropout=dropout, resume=True)
    assert second.global_step == 12 and not second.stopped_early
    assert_identical(trainable_snapshot(resumed.model), trainable_snapshot(straight.model))
    assert_identical(optimizer_tensors(resumed), optimizer_tensors(straight))
    assert resumed.scheduler.state_dict()["_last_lr"] == straight.scheduler.state_dict()["_last_lr"]
    assert resumed_decisions.choices == straight_decisions.choices
    assert torch.equal(resumed_decisions.mask, straight_decisions.mask)
    assert resumed_decisions.ranks == straight_decisions.ranks


def test_resumed_metrics_log_has_each_step_once(tmp_path):
    with pytest.raises(RuntimeError):
        train(tmp_path, dropout=0.0, extra=[StopAt(7, crash=True)])
    train(tmp_path, dropout=0.0, resume=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8, 12]


def test_lora_adapted_model_resumes_exactly_with_lora_dropout(tmp_path):
    def build(dropout):
        import deltatune as dt

        model = small_net()
        torch.manual_seed(1)
        return dt.adapt(model, dt.LoRAConfig(rank=2, targets=["body"], dropout=0.2, extra_trainable=["head"]))

    straight, _, _ = train(tmp_path / "a", dropout=0.0, build=build)
    train(tmp_path / "b", dropout=0.0, build=build, extra=[StopAt(6)])
    resumed, _, _ = train(tmp_path / "b", dropout=0.0, build=build, resume=True)
    snapshot = trainable_snapshot(resumed.model)
    assert any("lora_B" in name for name in snapshot) and not any(name.startswith("body.weight") for name in snapshot)
    assert_identical(snapshot, trainable_snapshot(straight.model))


def test_keeps_the_last_two_checkpoints(tmp_path):
    train(tmp_path, dropout=0.0, checkpoint_every=2)
    steps = [step for step, _ in list_checkpoints(checkpoints_root(tmp_path))]
    assert steps == [10, 12]
    assert not [p for p in checkpoints_root(tmp_path).iterdir() if p.name.startswith(".")]


def test_resume_refuses_a_changed_batch_size(tmp_path):
    train(tmp_path, dropout=0.0, extra=[StopAt(3)])
    with pytest.raises(TrainingError, match="batch_size=10 differs from the checkpoint's batch_size=8"):
        train(tmp_path, dropout=0.0, resume=True, batch_size=10)


def test_resume_refuses_other_callbacks(tmp_path):
    train(tmp_path, dropout=0.0, extra=[StopAt(3)])
    with pytest.raises(TrainingError, match="same callbacks"):
        train(tmp_path, dropout=0.0, resume=True, extra=[RandomDecisions()])


def test_resume_without_a_checkpoint_starts_fresh_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="holds no checkpoint"):
        _, _, result = train(tmp_path, dropout=0.0, resume=True)
    assert result.global_step == 12


def test_resume_after_the_end_trains_no_more(tmp_path):
    first, _, _ = train(tmp_path, dropout=0.0)
    again, _, result = train(tmp_path, dropout=0.0, resume=True)
    assert result.global_step == 12 and "eval_accuracy" in result.metrics
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8, 12]
    assert_identical(trainable_snapshot(again.model), trainable_snapshot(first.model))


def test_a_longer_run_continues_from_a_finished_one(tmp_path):
    """max_steps may grow on resume (the schedule is recomputed for the new length)."""
    train(tmp_path, dropout=0.0, max_steps=6)
    _, _, result = train(tmp_path, dropout=0.0, resume=True, max_steps=9)
    assert result.global_step == 9


def test_sara_with_its_schedule_callback_resumes_exactly(tmp_path):
    """A real method callback (random penalized matrix per step, progressive re-selection at half of training)
    keeps its decisions through a checkpoint; the nuclear-norm regularizer enters the loss."""
    import deltatune as dt
    from deltatune.methods.sara import SaRAConfig

    def run(folder, extra=(), resume=False):
        model = small_net(hidden=80)  # both matrices above SaRA's 100 penalized entries: a real random choice
        sara = SaRAConfig(fraction=0.5, targets=["body", "head"], nuclear_min_dim=0, nuclear_weight=1e-2, seed=3)
        model = dt.adapt(model, sara)
        config = TrainConfig(epochs=3, batch_size=8, lr=0.02, checkpoint_every=5, output_dir=str(folder),
                             resume=resume, progress=False)
        callbacks = [*sara.training_callbacks(model, total_steps=12), *extra]
        trainer = Trainer(model, config, BlobDataset(n=30), callbacks=callbacks)
        trainer.train()
        return trainer

    straight = run(tmp_path / "a")
    run(tmp_path / "b", extra=[StopAt(2)])  # before the progressive adjustment at step 6
    resumed = run(tmp_path / "b", resume=True)
    assert straight.callbacks[0].adjusted and resumed.callbacks[0].adjusted
    assert_identical(trainable_snapshot(resumed.model), trainable_snapshot(straight.model))
    buffers = {n: b for n, b in resumed.model.named_buffers() if "active" in n}
    assert buffers and all(torch.equal(b, dict(straight.model.named_buffers())[n]) for n, b in buffers.items())


def test_a_plugged_in_update_rule_resumes_exactly(tmp_path):
    """optimizer_factory with AdamR (its state holds the reference weights θ0): saved and restored weights-only."""
    from deltatune.optim.adamr import AdamR

    factory = AdamR.factory(weight_decay=1e-2)
    runs = {}
    for name, extra, resume in (("a", (), False), ("b", [StopAt(6)], False), ("b", (), True)):
        model = small_net()
        config = TrainConfig(epochs=3, batch_size=8, lr=0.02, checkpoint_every=5, output_dir=str(tmp_path / name),
                             resume=resume, progress=False)
        trainer = Trainer(model, config, BlobDataset(n=30), callbacks=list(extra), optimizer_factory=factory)
        trainer.train()
        runs[name] = trainer
    assert isinstance(runs["b"].optimizer, AdamR)
    assert runs["b"].optimizer.param_groups[0]["weight_decay"] == 1e-2
    assert_identical(trainable_snapshot(runs["b"].model), trainable_snapshot(runs["a"].model))


def test_adalora_rank_allocation_resumes_exactly(tmp_path):
    """An allocator callback (importance EMAs, budget schedule, rank masks) through a checkpoint: the resumed
    run ends with the same ranks and parameters; the orthogonality regularizer enters the loss."""
    import deltatune as dt

    def run(folder, extra=(), resume=False):
        model = small_net(hidden=32)
        torch.manual_seed(5)
        adalora = dt.config_for("adalora", targets=["body", "head"], init_rank=3, target_rank=1, mask_interval=1,
                                initial_warmup=1, final_warmup=2)
        model = dt.adapt(model, adalora)
        config = TrainConfig(epochs=6, batch_size=8, lr=0.05, checkpoint_every=3, output_dir=str(folder),
                             resume=resume, progress=False)
        callbacks = [*adalora.training_callbacks(model, total_steps=24), *extra]
        trainer = Trainer(model, config, BlobDataset(n=30), callbacks=callbacks)
        trainer.train()
        return trainer

    straight = run(tmp_path / "a")
    run(tmp_path / "b", extra=[StopAt(3)])  # early in the budget's decrease: the importance EMAs matter
    resumed = run(tmp_path / "b", resume=True)
    assert straight.callbacks[0].allocator.describe() == resumed.callbacks[0].allocator.describe()
    assert straight.callbacks[0].allocator.total_rank == 2  # target_rank 1 x 2 modules
    assert_identical(trainable_snapshot(resumed.model), trainable_snapshot(straight.model))

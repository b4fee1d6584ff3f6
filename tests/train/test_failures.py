"""NaN/inf stops training with a clear error and no checkpoint of the bad state; checkpoints are atomic and
never unpickle code."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from deltatune.errors import AdapterFileError, TrainingError
from deltatune.train import Callback, TrainConfig, Trainer, list_checkpoints
from deltatune.train.checkpoint import MODEL_FILE, OPTIMIZER_FILE, checkpoints_root, read_checkpoint
from train.trainer_toys import BlobDataset, small_net, trainable_snapshot


class PoisonAt(Callback):
    """Makes the loss NaN from step index `step` on (as a bad example or a diverging run would)."""

    def __init__(self, step: int) -> None:
        self.step, self.active = step, False

    def on_step_begin(self, global_step, **_):
        self.active = global_step >= self.step

    def loss(self, logits, labels):
        loss = F.cross_entropy(logits, labels)
        return loss * math.nan if self.active else loss


def config(tmp, **overrides):
    settings = dict(epochs=3, batch_size=8, lr=0.02, checkpoint_every=5, output_dir=str(tmp), progress=False)
    return TrainConfig(**{**settings, **overrides})


def test_nan_loss_stops_with_a_one_line_error_and_keeps_the_last_good_checkpoint(tmp_path):
    poison, model = PoisonAt(7), small_net()
    trainer = Trainer(model, config(tmp_path), BlobDataset(n=30), loss_fn=poison.loss, callbacks=[poison])
    before_bad_step: dict[str, torch.Tensor] = {}
    trainer.callbacks.append(type("Snap", (), {"on_step_end": lambda self, model, **_: before_bad_step.update(
        trainable_snapshot(model))})())
    with pytest.raises(TrainingError) as info:
        trainer.train()
    message = str(info.value)
    assert "loss became nan at step 8" in message and "\n" not in message
    assert "lower the learning rate" in message and "max_grad_norm" in message and "check the data" in message
    assert "step-000005" in message
    # No update from the bad step, and no checkpoint of it: step 5 stays the newest and loads.
    for name, value in trainable_snapshot(model).items():
        assert torch.equal(value, before_bad_step[name])
    assert [step for step, _ in list_checkpoints(checkpoints_root(tmp_path))] == [5]
    assert read_checkpoint(list_checkpoints(checkpoints_root(tmp_path))[0][1]).state["global_step"] == 5


def test_a_diverging_run_stops_before_writing_anything(tmp_path):
    sgd = lambda groups: torch.optim.SGD(groups)
    cfg = config(tmp_path, lr=1e30, max_grad_norm=None, schedule="constant")
    with pytest.raises(TrainingError, match=r"became (nan|inf) at step \d+ .*no checkpoint written"):
        Trainer(small_net(), cfg, BlobDataset(n=30), optimizer_factory=sgd).train()
    assert list_checkpoints(checkpoints_root(tmp_path)) == []


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (finite loss), infinite backward: only the gradient-norm check can see it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def test_infinite_gradient_with_a_finite_loss_is_caught_at_clipping(tmp_path):
    loss_fn = lambda logits, labels: F.cross_entropy(InfiniteGradient.apply(logits), labels)
    with pytest.raises(TrainingError, match="gradient norm became (nan|inf) at step 1 "):
        Trainer(small_net(), config(tmp_path), BlobDataset(n=30), loss_fn=loss_fn).train()
    assert list_checkpoints(checkpoints_root(tmp_path)) == []


def test_a_failure_while_saving_leaves_no_partial_folder_and_the_old_checkpoint_intact(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_then_fail(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 10): its safetensors files are already written
            raise OSError("No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        Trainer(small_net(), config(tmp_path), BlobDataset(n=30)).train()
    root = checkpoints_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000005"]  # no step-000010, no hidden staging dir
    assert read_checkpoint(root / "step-000005").state["global_step"] == 5
    assert load_file(str(root / "step-000005" / MODEL_FILE)).keys()


class Payload:
    """A pickled object that would run code when unpickled."""

    def __reduce__(self):
        return (print, ("owned",))


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path, capsys):
    Trainer(small_net(), config(tmp_path, max_steps=5), BlobDataset(n=30)).train()
    folder = list_checkpoints(checkpoints_root(tmp_path))[-1][1]
    torch.save({"optimizer": Payload(), "scheduler": {}}, folder / OPTIMIZER_FILE)
    with pytest.raises(AdapterFileError, match="step-000005 is unreadable"):
        Trainer(small_net(), config(tmp_path, resume=True), BlobDataset(n=30)).train()
    assert "owned" not in capsys.readouterr().out


def test_no_trainable_parameters_is_a_clear_error():
    model = small_net()
    model.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameter"):
        Trainer(model, TrainConfig(progress=False), BlobDataset())


def test_batches_without_labels_are_a_clear_error():
    collate = lambda items: {"x": torch.stack([item["x"] for item in items])}
    with pytest.raises(TrainingError, match="expected a dict of tensors with a 'labels' entry"):
        Trainer(small_net(), TrainConfig(progress=False), BlobDataset(), collate_fn=collate).train()

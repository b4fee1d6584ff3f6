"""deltatune's training callbacks and regularizers in a transformers Trainer: SaRA's progressive re-selection
and nuclear-norm penalty run through `DeltatuneCallbacks` and `RegularizedLoss`, checkpoints hold the adapter
alone, and `resume_from_checkpoint` ends on the same weights (and the same selection) as an uninterrupted run."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.methods.sara import SaRAConfig

transformers = pytest.importorskip("transformers")
from deltatune.integrations.transformers import (  # noqa: E402
    DeltatuneCallbacks,
    RegularizedLoss,
    SaveAdapterCallback,
)
from integrations.stateful import FreezeAfter  # noqa: E402

STEPS = 8


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(40, 36), nn.Linear(36, 5)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = self.second(torch.tanh(self.first(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _data() -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=generator)
    return [{"x": row, "labels": label} for row, label in zip(x, torch.randint(5, (64,), generator=generator))]


CONFIG = SaRAConfig(fraction=0.3, nuclear_weight=0.05, nuclear_min_dim=8, targets=["first"], seed=3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return dt.adapt(Square(), CONFIG)


class Seen:
    """Records what the bridged hooks receive (stateless: not in checkpoints)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, int]] = []
        self.grads_at_step_end: list[bool] = []

    def on_backward_end(self, global_step, **_):
        self.steps.append(("backward", global_step))

    def on_step_end(self, global_step, model, **_):
        self.steps.append(("end", global_step))
        self.grads_at_step_end.append(all(p.grad is not None for p in model.parameters() if p.requires_grad))


def _trainer(model, out, trainer_cls, callbacks, **changes):
    settings = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=0.05,
                    report_to=[], save_strategy="steps", save_steps=4, use_cpu=True, logging_steps=1,
                    disable_tqdm=True, lr_scheduler_type="linear", seed=0)
    args = transformers.TrainingArguments(**{**settings, **changes})
    return trainer_cls(model=model, args=args, train_dataset=_data(), callbacks=callbacks)


class DeltaTrainer(RegularizedLoss, transformers.Trainer):
    pass


def _run(out, resume_at=None, trainer_cls=DeltaTrainer):
    model = _model()
    schedule = copy.deepcopy(CONFIG).training_callbacks(model, total_steps=STEPS)
    seen = Seen()
    bridge = DeltatuneCallbacks([*schedule, FreezeAfter(), seen])
    trainer = _trainer(model, out, trainer_cls, [bridge, SaveAdapterCallback()])
    if resume_at is None:
        trainer.train()
        return model, schedule, seen
    trainer.train()  # then resume a fresh model from the middle checkpoint
    model = _model()
    schedule = copy.deepcopy(CONFIG).training_callbacks(model, total_steps=STEPS)
    bridge = DeltatuneCallbacks([*schedule, FreezeAfter(), seen])
    trainer = _trainer(model, out, trainer_cls, [bridge, SaveAdapterCallback()])
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{resume_at}"))
    assert bridge.callbacks[-2].count == STEPS  # its count came back from the checkpoint
    return model, schedule, seen


def _trainable(model) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _selections(model) -> list[Tensor]:
    return [delta.active.clone() for _, _, delta in dt.iter_deltas(model)]


def test_the_schedules_run_through_the_bridge_with_gradients_in_place(tmp_path):
    model, schedule, seen = _run(tmp_path / "a")
    assert schedule[0].adjusted  # SaRA's re-selection ran at half of training
    assert seen.steps[:4] == [("backward", 0), ("end", 1), ("backward", 1), ("end", 2)]
    assert len(seen.grads_at_step_end) == STEPS and all(seen.grads_at_step_end)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoint-4").iterdir()) >= ["adapter"]
    assert (tmp_path / "a" / "checkpoint-4" / "deltatune_callbacks.json").is_file()


def test_the_regularizer_joins_the_loss(tmp_path):
    penalized, _, _ = _run(tmp_path / "with")
    plain, _, _ = _run(tmp_path / "without", trainer_cls=transformers.Trainer)
    differences = [not torch.allclose(a, b) for a, b in zip(_trainable(penalized).values(),
                                                              _trainable(plain).values())]
    assert any(differences)


def test_resume_from_checkpoint_is_exact(tmp_path):
    straight, straight_schedule, _ = _run(tmp_path / "straight")
    resumed, resumed_schedule, _ = _run(tmp_path / "resumed", resume_at=4)
    for (name, a), b in zip(_trainable(straight).items(), _trainable(resumed).values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for a, b in zip(_selections(straight), _selections(resumed)):
        assert torch.equal(a, b)
    assert resumed_schedule[0].adjusted == straight_schedule[0].adjusted


def test_the_checkpoint_adapter_loads_into_a_fresh_base(tmp_path):
    trained, _, _ = _run(tmp_path / "a")
    torch.manual_seed(0)
    fresh = Square()
    dt.load_adapter(fresh, tmp_path / "a" / "adapter")
    x = torch.randn(4, 40)
    torch.testing.assert_close(fresh(x, torch.zeros(4, dtype=torch.long))["logits"],
                               trained(x, torch.zeros(4, dtype=torch.long))["logits"])

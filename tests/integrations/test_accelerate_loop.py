"""The accelerate pattern for a plain loop: deltatune's schedules fired at the loop's points, the deltas'
regularizer in the loss, the schedules' states registered with `accelerator.save_state`, and a resumed run
(load_state + skip the seen batches) ending on the uninterrupted run's weights and selections."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deltatune as dt
from deltatune.methods.sara import SaRAConfig
from deltatune.train.callbacks import fire
from integrations.stateful import FreezeAfter

accelerate = pytest.importorskip("accelerate")

CONFIG = SaRAConfig(fraction=0.3, nuclear_weight=0.05, nuclear_min_dim=8, targets=["0"], seed=3)
STEPS = 8


class Schedules:
    """The schedules as one object accelerate can checkpoint (`register_for_checkpointing`)."""

    def __init__(self, callbacks: list) -> None:
        self.callbacks = callbacks

    def state_dict(self) -> dict:
        return {str(i): c.state_dict() for i, c in enumerate(self.callbacks)}

    def load_state_dict(self, state: dict) -> None:
        for i, callback in enumerate(self.callbacks):
            callback.load_state_dict(state[str(i)])


def _run(folder, stop_at: int | None = None, resume: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(40, 36), nn.Tanh(), nn.Linear(36, 5)), CONFIG)
    schedules = [*copy.deepcopy(CONFIG).training_callbacks(model, total_steps=STEPS), FreezeAfter()]
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 40, generator=generator), torch.randint(5, (64,), generator=generator))
    accelerator = accelerate.Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loader = DataLoader(data, batch_size=8, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(Schedules(schedules))
    start = 0
    if resume:
        accelerator.load_state(str(folder))
        start = stop_at
    for step, (x, y) in enumerate(loader):
        if step < start:
            continue  # already trained before the checkpoint
        context = dict(model=accelerator.unwrap_model(model), optimizer=optimizer, scheduler=None, epoch=0)
        fire(schedules, "on_step_begin", global_step=step, **context)
        loss = nn.functional.cross_entropy(model(x), y) + dt.regularization_loss(accelerator.unwrap_model(model))
        accelerator.backward(loss)
        fire(schedules, "on_backward_end", global_step=step, **context)
        optimizer.step()
        fire(schedules, "on_step_end", global_step=step + 1, **context)
        optimizer.zero_grad()
        if stop_at is not None and not resume and step + 1 == stop_at:
            accelerator.save_state(str(folder))
            break
    return accelerator.unwrap_model(model)


def test_an_accelerate_loop_resumes_exactly(tmp_path):
    straight = _run(None)
    _run(tmp_path / "state", stop_at=4)
    resumed = _run(tmp_path / "state", stop_at=4, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [d.penalized for _, _, d in dt.iter_deltas(straight)] == [d.penalized for _, _, d in dt.iter_deltas(resumed)]


"""Gradient accumulation, clipping and the regularizer, against float64 references computed by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.train import Callback, TrainConfig, Trainer
from deltatune.train.data_order import epoch_permutation
from train.trainer_toys import BlobDataset, small_net, trainable_snapshot

F64 = torch.float64


def run(accum: int, *, batch_size: int = 12, epochs: int = 2, **overrides) -> dict[str, torch.Tensor]:
    model = small_net(dtype=F64)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, grad_accum_steps=accum, lr=0.05, progress=False,
                         warmup_steps=2, **overrides)
    Trainer(model, config, BlobDataset(n=30, dtype=F64)).train()
    return trainable_snapshot(model)


def reference_run(batch_size: int = 12, epochs: int = 2, lr: float = 0.05, max_norm: float | None = 1.0,
                  regularizer=None) -> dict[str, torch.Tensor]:
    """The same training written out by hand: whole global batches, no trainer."""
    model, data = small_net(dtype=F64), BlobDataset(n=30, dtype=F64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = -(-len(data) // batch_size)
    total, warmup = epochs * steps_per_epoch, 2
    step = 0
    for epoch in range(epochs):
        order = epoch_permutation(len(data), 0, epoch)
        for b in range(steps_per_epoch):
            index = torch.tensor(order[b * batch_size:(b + 1) * batch_size])
            for group in optimizer.param_groups:
                group["lr"] = lr * (step / warmup if step < warmup else (total - step) / (total - warmup))
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x[index]), data.labels[index])
            if regularizer is not None:
                loss = loss + regularizer(model)
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            step += 1
    return trainable_snapshot(model)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_trainer_matches_a_hand_written_loop_in_float64():
    assert_same(run(1), reference_run(), atol=1e-12)


@pytest.mark.parametrize("accum", [2, 3, 5])
def test_accumulated_micro_batches_equal_one_big_batch(accum):
    # 30 examples, batch 12: steps of 12, 12 and 6 examples; accum 5 gives uneven micro-batches (3,3,2,2,2).
    assert_same(run(accum), run(1), atol=1e-12)


def test_regularizer_is_added_once_per_step_whatever_the_accumulation(monkeypatch):
    def penalty(model):
        return 0.1 * model.head.weight.square().sum()

    monkeypatch.setattr("deltatune.train.trainer.regularization", penalty)
    expected = reference_run(regularizer=penalty)
    assert_same(run(1), expected, atol=1e-12)
    assert_same(run(3), expected, atol=1e-12)


class GradientRecorder(Callback):
    def __init__(self) -> None:
        self.before_clip: list[dict[str, torch.Tensor]] = []

    def on_backward_end(self, model, **_):
        self.before_clip.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("max_norm", [None, 0.05, 1e6])
def test_clipping_scales_the_global_gradient_norm(max_norm):
    model, recorder = small_net(dtype=F64), GradientRecorder()
    start = trainable_snapshot(model)
    lr = 0.1
    config = TrainConfig(max_steps=1, batch_size=30, lr=lr, schedule="constant", max_grad_norm=max_norm,
                         progress=False)
    sgd = lambda groups: torch.optim.SGD(groups, lr=123.0)  # the config's lr wins over the factory's
    Trainer(model, config, BlobDataset(n=30, dtype=F64), callbacks=[recorder], optimizer_factory=sgd).train()
    grads = recorder.before_clip[0]
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    scale = 1.0 if max_norm is None else min(1.0, max_norm / (float(norm) + 1e-6))  # torch adds 1e-6
    if max_norm == 0.05:
        assert scale < 0.5, "the test must exercise actual clipping"
    end = trainable_snapshot(model)
    for name, grad in grads.items():
        torch.testing.assert_close(end[name], start[name] - lr * scale * grad, atol=1e-12, rtol=0)

"""PS-KD: the progressive targets (1 − α_t)·y + α_t·p^(t−1), the per-sample table under shuffling, composition
with delta methods, bad input; and the sample index a batch may carry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import deltatune as dt
from deltatune.data.datasets import TensorDictDataset
from deltatune.errors import ConfigError, TrainingError
from deltatune.train import ProgressiveSelfKnowledgeDistillation, TrainConfig, Trainer, with_sample_index
from deltatune.train.pskd import pskd_alpha, soft_cross_entropy

from .trainer_toys import BlobDataset, small_net

# Three examples whose epoch-0 logits give simple probabilities: [3/4, 1/4], [1/2, 1/2], [1/5, 4/5].
EPOCH0_LOGITS = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, math.log(4.0)]])
LABELS = torch.tensor([0, 1, 1])


def test_alpha_grows_linearly_to_alpha_T_at_the_last_epoch() -> None:
    assert [pskd_alpha(t, 4) for t in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert pskd_alpha(0, 2, alpha_T=0.5) == pytest.approx(0.25)


def test_targets_by_hand_three_samples_two_epochs() -> None:
    pskd = ProgressiveSelfKnowledgeDistillation(3, epochs=2)
    shuffled = torch.tensor([2, 0, 1])  # epoch 0 visits the examples in another order than their indices
    logits0 = EPOCH0_LOGITS[shuffled].clone().requires_grad_(True)
    loss0 = pskd.loss(logits0, LABELS[shuffled], shuffled, epoch=0)
    torch.testing.assert_close(loss0, F.cross_entropy(logits0, LABELS[shuffled]))  # epoch 0: plain one-hot
    # Epoch 1: α_1 = 0.8·2/2 = 0.8; ỹ = 0.2·y + 0.8·p⁰, written out by hand.
    by_hand = torch.tensor([[0.2 * 1 + 0.8 * 0.75, 0.8 * 0.25],
                            [0.8 * 0.5, 0.2 * 1 + 0.8 * 0.5],
                            [0.8 * 0.2, 0.2 * 1 + 0.8 * 0.8]])
    torch.testing.assert_close(by_hand, torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.16, 0.84]]))
    order1 = torch.tensor([1, 2, 0])
    torch.testing.assert_close(pskd.targets(LABELS[order1], order1, 1, 2), by_hand[order1])
    logits1 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss1 = pskd.loss(logits1, LABELS[order1], order1, epoch=1)
    expected = -(by_hand[order1] * F.log_softmax(logits1, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss1, expected)
    loss1.backward()  # the teacher side carries no gradient: d loss / d logits = (softmax − ỹ)/B
    torch.testing.assert_close(logits1.grad, (F.softmax(logits1.detach(), 1) - by_hand[order1]) / 3)


def test_alpha_T_zero_is_plain_cross_entropy() -> None:
    pskd = ProgressiveSelfKnowledgeDistillation(3, epochs=3, alpha_T=0.0)
    index = torch.arange(3)
    pskd.loss(EPOCH0_LOGITS, LABELS, index, 0)
    logits = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pskd.loss(logits, LABELS, index, 2), F.cross_entropy(logits, LABELS))
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(LABELS, 2).float()),
                               F.cross_entropy(logits, LABELS))


class IdentityInputs(nn.Module):
    """Logits = W·x with x the one-hot of the example: each example's prediction is its own row of W."""

    def __init__(self, n: int, classes: int) -> None:
        super().__init__()
        self.table = nn.Linear(n, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table(x)


def test_the_table_follows_the_trainers_shuffling() -> None:
    n = 6
    data = TensorDictDataset({"x": torch.eye(n), "labels": torch.tensor([0, 1, 2, 0, 1, 2])})
    torch.manual_seed(0)
    model = IdentityInputs(n, 3)
    pskd = ProgressiveSelfKnowledgeDistillation(n)
    seen: list[dict] = []

    def recording(outputs, labels, sample_index=None):
        loss = pskd(outputs, labels, sample_index=sample_index)
        if pskd._epoch is not None:
            seen.append({"epoch": pskd._epoch, "index": sample_index.clone(), "logits": outputs.detach().clone(),
                         "labels": labels.clone(), "loss": loss.detach()})
        return loss

    config = TrainConfig(epochs=2, batch_size=2, lr=0.5, progress=False, eval_every_epoch=False, seed=3)
    Trainer(model, config, with_sample_index(data), loss_fn=recording, callbacks=[pskd]).train()
    order = {epoch: torch.cat([r["index"] for r in seen if r["epoch"] == epoch]).tolist() for epoch in (0, 1)}
    assert sorted(order[0]) == list(range(n)) and order[0] != order[1] and order[0] != list(range(n))
    first = {int(i): F.softmax(r["logits"][k], 0) for r in seen if r["epoch"] == 0 for k, i in enumerate(r["index"])}
    for record in (r for r in seen if r["epoch"] == 1):
        index = record["index"].tolist()
        previous = torch.stack([first[i] for i in index])
        targets = 0.2 * F.one_hot(record["labels"], 3) + 0.8 * previous  # α_1 = 0.8 with T = 2
        torch.testing.assert_close(record["loss"], soft_cross_entropy(record["logits"], targets))
    assert pskd.epochs == 2 and bool(pskd.seen.all())
    last = {int(i): F.softmax(r["logits"][k], 0) for r in seen if r["epoch"] == 1 for k, i in enumerate(r["index"])}
    torch.testing.assert_close(pskd.predictions, torch.stack([last[i] for i in range(n)]))


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_composes_with_delta_methods(method: str) -> None:
    model = small_net()
    base = {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith("body")}
    options = {"rank": 2} if method == "lora" else {}
    dt.adapt(model, dt.config_for(method, targets=["body"], extra_trainable=["head"], **options))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = BlobDataset(24)
    pskd = ProgressiveSelfKnowledgeDistillation(len(data))
    config = TrainConfig(epochs=3, batch_size=8, lr=5e-2, progress=False, eval_every_epoch=False)
    trainer = Trainer(model, config, with_sample_index(data), data, loss_fn=pskd, callbacks=[pskd])
    trainer.train()
    deltas = [n for n in before if ".deltas." in n]
    assert deltas and all(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in deltas)
    for name, value in base.items():  # the frozen base weights did not move
        torch.testing.assert_close(model.get_parameter(name.replace("body.", "body.base_layer.")), value)
    assert bool(pskd.seen.all()) and torch.allclose(pskd.predictions.sum(1), torch.ones(len(data)))
    metrics = trainer.evaluate(data)  # evaluation: plain cross-entropy, no sample index needed
    with torch.no_grad():
        expected = F.cross_entropy(model(data.x), data.labels)
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_state_travels_in_the_state_dict() -> None:
    pskd = ProgressiveSelfKnowledgeDistillation(3, epochs=2)
    pskd.loss(EPOCH0_LOGITS, LABELS, torch.arange(3), 0)
    copy = ProgressiveSelfKnowledgeDistillation(3)
    copy.load_state_dict(pskd.state_dict())
    assert copy.epochs == 2
    torch.testing.assert_close(copy.targets(LABELS, torch.arange(3), 1, 2), pskd.targets(LABELS, torch.arange(3), 1, 2))


@pytest.mark.parametrize("alpha_T", [-0.1, 1.5, float("nan")])
def test_alpha_outside_0_1_is_refused(alpha_T: float) -> None:
    with pytest.raises(ConfigError, match=r"alpha_T=.* is invalid: expected a weight in \[0, 1\]"):
        ProgressiveSelfKnowledgeDistillation(10, alpha_T=alpha_T)


def test_a_missing_sample_index_is_a_clear_error() -> None:
    data = BlobDataset(8)
    pskd = ProgressiveSelfKnowledgeDistillation(len(data))
    trainer = Trainer(small_net(), TrainConfig(epochs=1, batch_size=4, progress=False), data, loss_fn=pskd,
                      callbacks=[pskd])
    with pytest.raises(TrainingError, match=r"without sample indices; wrap the training set with .*with_sample_index"):
        trainer.train()
    with pytest.raises(TrainingError, match="needs dict items"):
        with_sample_index(TensorDataset(torch.zeros(2, 3), torch.zeros(2)))[0]


def test_other_bad_input_is_refused() -> None:
    pskd = ProgressiveSelfKnowledgeDistillation(3, epochs=2)
    with pytest.raises(TrainingError, match=r"sample index 5 is outside \[0, 3\)"):
        pskd.loss(EPOCH0_LOGITS, LABELS, torch.tensor([0, 1, 5]), 0)
    with pytest.raises(ConfigError, match=r"epoch=2 is outside \[0, 2\)"):
        pskd.loss(EPOCH0_LOGITS, LABELS, torch.arange(3), 2)
    with pytest.raises(ConfigError, match="does not know T"):
        ProgressiveSelfKnowledgeDistillation(3).loss(EPOCH0_LOGITS, LABELS, torch.arange(3), 0)
    with pytest.raises(ConfigError, match="num_samples"):
        ProgressiveSelfKnowledgeDistillation(0)


def test_the_sample_index_is_not_given_to_the_model() -> None:
    from deltatune.train.batches import split_batch

    batch = split_batch({"x": torch.zeros(2, 3), "labels": torch.zeros(2), "sample_index": torch.tensor([4, 1])})
    assert set(batch.kwargs) == {"x"} and batch.sample_index.tolist() == [4, 1]
    assert split_batch({"x": torch.zeros(2, 3), "labels": torch.zeros(2)}).sample_index is None


def test_pskd_in_a_transformers_trainer(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from deltatune.integrations.transformers import ProgressiveTargetsCallback, ProgressiveTargetsStep

    class PSKDTrainer(ProgressiveTargetsStep, transformers.Trainer):
        pass

    data = BlobDataset(16)
    model = dt.adapt(small_net(), dt.config_for("lora", rank=2, targets=["body"], extra_trainable=["head"]))
    pskd = ProgressiveSelfKnowledgeDistillation(len(data))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    trainer = PSKDTrainer(model=model, args=args, train_dataset=with_sample_index(data),
                          callbacks=[ProgressiveTargetsCallback(pskd)])
    output = trainer.train()
    assert output.global_step == 8 and pskd.epochs == 2 and bool(pskd.seen.all())
    torch.testing.assert_close(pskd.predictions.sum(1), torch.ones(len(data)))


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, progress, global_step, **_):
        if global_step == self.step:
            progress.request_stop()


def _pskd_run(tmp, *, stop_at: int | None = None, resume: bool = False):
    data = BlobDataset(20)
    model = small_net()
    pskd = ProgressiveSelfKnowledgeDistillation(len(data))
    config = TrainConfig(epochs=3, batch_size=8, lr=5e-2, progress=False, eval_every_epoch=False,
                         output_dir=str(tmp), checkpoint_every=2, resume=resume)
    extra = [StopAt(stop_at)] if stop_at else []
    Trainer(model, config, with_sample_index(data), loss_fn=pskd, callbacks=[pskd, *extra]).train()
    return model, pskd


def test_a_resumed_run_ends_like_an_uninterrupted_one(tmp_path) -> None:
    whole_model, whole = _pskd_run(tmp_path / "whole")
    _pskd_run(tmp_path / "split", stop_at=4)  # mid-epoch 1 (3 steps per epoch)
    split_model, split = _pskd_run(tmp_path / "split", resume=True)
    torch.testing.assert_close(split.predictions, whole.predictions, rtol=0, atol=0)
    for (name, a), (_, b) in zip(whole_model.named_parameters(), split_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

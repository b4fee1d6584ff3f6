"""Data order (seeded per epoch, sharded without overlap), evaluation numbers, model outputs, DataLoader workers."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError, TrainingError
from deltatune.train import TrainConfig, Trainer
from deltatune.train.data_order import epoch_permutation, global_batch, micro_batches, steps_per_epoch
from train.trainer_toys import BlobDataset, small_net, trainable_snapshot


def test_each_epoch_is_a_seeded_permutation():
    first, second = epoch_permutation(50, seed=3, epoch=0), epoch_permutation(50, seed=3, epoch=1)
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert first != second
    assert first == epoch_permutation(50, seed=3, epoch=0)
    assert first != epoch_permutation(50, seed=4, epoch=0)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 16), world=st.integers(1, 4), accum=st.integers(1, 5))
def test_shards_cover_every_global_batch_exactly_once(n, batch, world, accum):
    order = epoch_permutation(n, 0, 0)
    for b in range(steps_per_epoch(n, batch)):
        members = global_batch(order, batch, b)
        seen, weight = [], 0.0
        for rank in range(world):
            plan = micro_batches(members, rank, world, accum)
            assert plan and plan[-1].last and not any(m.last for m in plan[:-1]) and len(plan) <= accum
            real = [m for m in plan if m.weight > 0]
            assert len(real) in (len(plan), 0)  # a process either has examples or one placeholder
            seen += [i for m in real for i in m.indices]
            weight += sum(m.weight for m in plan)
        assert sorted(seen) == sorted(members)
        assert weight == pytest.approx(1.0)


def test_evaluate_matches_a_direct_computation():
    model, data = small_net(dtype=torch.float64), BlobDataset(n=23, dtype=torch.float64)
    trainer = Trainer(model, TrainConfig(eval_batch_size=5, progress=False), data)
    metrics = trainer.evaluate(data)
    with torch.no_grad():
        logits = model(data.x)
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, data.labels)), abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == data.labels).double().mean()))
    assert model.training, "evaluate() restores training mode"


def test_models_returning_objects_with_logits_are_supported():
    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = small_net()

        def forward(self, x):
            return SimpleNamespace(logits=self.inner(x), hidden=None)

    result = Trainer(Wrapped(), TrainConfig(max_steps=2, batch_size=6, progress=False), BlobDataset(n=12),
                     BlobDataset(n=6)).train()
    assert result.global_step == 2 and 0 <= result.metrics["eval_accuracy"] <= 1


def test_unusable_model_outputs_are_a_clear_error():
    class Strange(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = small_net()

        def forward(self, x):
            return {"scores": self.inner(x)}

    with pytest.raises(TrainingError, match="expected logits"):
        Trainer(Strange(), TrainConfig(max_steps=1, batch_size=6, progress=False), BlobDataset(n=12)).train()


def test_dataloader_workers_read_the_same_batches():
    def run(workers):
        model = small_net()
        config = TrainConfig(epochs=2, batch_size=8, num_workers=workers, progress=False)
        Trainer(model, config, BlobDataset(n=20)).train()
        return trainable_snapshot(model)

    with_workers, without = run(2), run(0)
    for name in without:
        assert torch.equal(with_workers[name], without[name]), name


def test_only_trainable_parameters_change():
    model = small_net(frozen_first=True)
    frozen = model.body.weight.detach().clone()
    Trainer(model, TrainConfig(max_steps=3, batch_size=8, progress=False), BlobDataset(n=20)).train()
    assert torch.equal(model.body.weight, frozen)


def test_trainer_wants_a_train_config_and_data():
    with pytest.raises(ConfigError, match="expected a deltatune.train.TrainConfig"):
        Trainer(small_net(), {"epochs": 1}, BlobDataset())
    with pytest.raises(TrainingError, match="training dataset is empty"):
        Trainer(small_net(), TrainConfig(progress=False), BlobDataset(n=0))


def test_tuple_batches_train_and_evaluate_exactly_like_dict_batches():
    """A TensorDataset(x, y) is called as model(x); the run equals the dict-batch run step for step."""
    from torch.utils.data import TensorDataset

    data = BlobDataset(n=40, dtype=torch.float64)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, progress=False, seed=3)
    runs = []
    for dataset in (data, TensorDataset(data.x, data.labels)):
        model = small_net(dtype=torch.float64)
        trainer = Trainer(model, config, dataset, dataset)
        result = trainer.train()
        runs.append((result.history, trainer.evaluate(), trainable_snapshot(model)))
    (history_a, metrics_a, weights_a), (history_b, metrics_b, weights_b) = runs
    losses_a, losses_b = ([r["loss"] for r in h if "loss" in r] for h in (history_a, history_b))
    assert losses_a and losses_a == losses_b
    assert metrics_a == metrics_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.parametrize("item", [{"x": torch.zeros(3)}, torch.zeros(3)])
def test_batches_without_labels_name_both_conventions(item):
    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index):
            return item

    trainer = Trainer(small_net(features=3), TrainConfig(max_steps=1, batch_size=2, progress=False), Items())
    with pytest.raises(TrainingError, match=r"expected a dict of tensors with a 'labels' entry or a tuple"):
        trainer.train()

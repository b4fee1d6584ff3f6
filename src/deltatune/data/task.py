"""The `Task` bundle every built-in task loads into: splits, label names, a model factory and the collate function."""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from deltatune.data.datasets import TensorDictDataset, collate_dicts, evaluate_accuracy
from deltatune.data.sampling import stratified_subset
from deltatune.errors import ConfigError, DeltatuneError

SPLITS = ("train", "validation", "test")


class UnknownTaskError(DeltatuneError, ValueError):
    """The task name is not one of the built-in tasks."""


@dataclass(frozen=True)
class Task:
    """A built-in task: classification (scored by accuracy) or any task with its own scorer.

    `build_model(**kw)` returns a fresh model for the task (head initialised from torch's global RNG, so seed
    with `torch.manual_seed` first); `extra_trainable` names the modules trained and saved besides deltas;
    `default_targets` are the modules a method adapts on this task's model when the caller names none (None:
    the method's own default); `collate` stacks dataset items into a batch (see deltatune.data.datasets for
    the batch convention). `metric` names what `score` returns; `scorer(model, dataset) -> float` computes it
    (None: classification accuracy), `higher_is_better` says which way is better (a Fréchet distance is
    lower-is-better). Training always minimises the model's loss; the metric is what results are read by.
    """

    name: str
    description: str
    label_names: tuple[str, ...]
    train: TensorDictDataset
    validation: TensorDictDataset
    test: TensorDictDataset
    model_factory: Callable[..., nn.Module]
    extra_trainable: tuple[str, ...] = ("classifier",)
    default_targets: tuple[str, ...] | None = None
    collate: Callable[[list[dict]], dict] = field(default=collate_dicts)
    metric: str = "accuracy"
    higher_is_better: bool = True
    scorer: Callable[[nn.Module, Dataset], float] | None = None

    def __post_init__(self) -> None:
        if self.scorer is None and self.metric != "accuracy":
            raise DeltatuneError(f"task {self.name!r} names metric {self.metric!r} but has no scorer: expected "
                                 "scorer=(model, dataset) -> float, or metric='accuracy'")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def build_model(self, **kwargs: Any) -> nn.Module:
        """A fresh classifier for this task; keyword arguments go to the model factory (e.g. pooling, arch)."""
        return self.model_factory(num_classes=self.num_classes, **kwargs)

    def score(self, model: nn.Module, dataset: Dataset) -> float:
        """The task's metric of `model` on `dataset` (a split of this task): accuracy unless the task says
        otherwise; the model's train/eval mode is left as it was."""
        if self.scorer is None:
            return evaluate_accuracy(model, dataset)
        was_training = model.training
        try:
            return float(self.scorer(model, dataset))
        finally:
            model.train(was_training)

    def better(self, a: float, b: float) -> bool:
        """True when score `a` is strictly better than `b` under this task's metric."""
        return a > b if self.higher_is_better else a < b

    def split(self, name: str) -> TensorDictDataset:
        if name not in SPLITS:
            raise ConfigError(f"split={name!r} is invalid: expected one of {SPLITS}")
        return getattr(self, name)


def limit_train_size(train: TensorDictDataset, train_size: int | None, seed: int) -> TensorDictDataset:
    """The whole training split, or a subset of `train_size` examples drawn with `seed`: label-stratified when
    each example has one class label, else uniform (token labels of a generation task have no class)."""
    if train_size is None:
        return train
    if not 1 <= train_size <= len(train):
        raise ConfigError(
            f"train_size={train_size} is invalid: expected an integer from 1 to {len(train)} (the training split "
            "size); pass train_size=None for the whole split"
        )
    if train.labels.dim() != 1:
        return train.subset(sorted(random.Random(seed).sample(range(len(train)), train_size)))
    return train.subset(stratified_subset(train.labels.tolist(), train_size, seed))

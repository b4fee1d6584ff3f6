"""The `Task` bundle every built-in task loads into: splits, label names, a model factory and the collate function."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltatune.data.datasets import TensorDictDataset, collate_dicts
from deltatune.data.sampling import stratified_subset
from deltatune.errors import ConfigError, DeltatuneError

SPLITS = ("train", "validation", "test")


class UnknownTaskError(DeltatuneError, ValueError):
    """The task name is not one of the built-in tasks."""


@dataclass(frozen=True)
class Task:
    """A built-in classification task.

    `build_model(**kw)` returns a fresh model for the task (head initialised from torch's global RNG, so seed
    with `torch.manual_seed` first); `extra_trainable` names the modules trained and saved besides deltas;
    `default_targets` are the modules a method adapts on this task's model when the caller names none (None:
    the method's own default); `collate` stacks dataset items into a batch (see deltatune.data.datasets for
    the batch convention).
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

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def build_model(self, **kwargs: Any) -> nn.Module:
        """A fresh classifier for this task; keyword arguments go to the model factory (e.g. pooling, arch)."""
        return self.model_factory(num_classes=self.num_classes, **kwargs)

    def split(self, name: str) -> TensorDictDataset:
        if name not in SPLITS:
            raise ConfigError(f"split={name!r} is invalid: expected one of {SPLITS}")
        return getattr(self, name)


def limit_train_size(train: TensorDictDataset, train_size: int | None, seed: int) -> TensorDictDataset:
    """The whole training split, or a label-stratified subset of `train_size` examples drawn with `seed`."""
    if train_size is None:
        return train
    if not 1 <= train_size <= len(train):
        raise ConfigError(
            f"train_size={train_size} is invalid: expected an integer from 1 to {len(train)} (the training split "
            "size); pass train_size=None for the whole split"
        )
    return train.subset(stratified_subset(train.labels.tolist(), train_size, seed))

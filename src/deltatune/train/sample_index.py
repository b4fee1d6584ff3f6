"""Datasets whose items carry their own index, so that a loss can keep per-example state.

    from deltatune.train.sample_index import with_sample_index
    indexed = with_sample_index(task.train)      # item i gets "sample_index": i
    Trainer(model, config, indexed, task.validation, loss_fn=pskd, callbacks=[pskd])

The trainer takes `"sample_index"` out of every dict batch before calling the model (`batches.SAMPLE_INDEX`)
and hands it to a `loss_fn` that names a `sample_index` parameter; evaluation batches need none. Indices are
positions in the wrapped dataset, so they follow the trainer's shuffling (each epoch's permutation reorders
the items, and each item brings its index along).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from deltatune.errors import TrainingError
from deltatune.train.batches import SAMPLE_INDEX


class IndexedDataset(Dataset):
    """`dataset` with `"sample_index"` (an int64 scalar, the item's position) added to each dict item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TrainingError(f"with_sample_index needs dict items (the deltatune.data convention); item {index} "
                                f"is a {type(item).__name__}; build the dataset as deltatune.data.datasets."
                                "TensorDictDataset({'x': inputs, 'labels': labels}) with a model that takes x=")
        if SAMPLE_INDEX in item:
            raise TrainingError(f"item {index} already has a '{SAMPLE_INDEX}' entry; wrap the dataset only once")
        return {**item, SAMPLE_INDEX: torch.tensor(index, dtype=torch.long)}

    def __getattr__(self, name: str) -> Any:
        # Keeps the wrapped dataset's own attributes (`labels`, `texts`, ...) reachable.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_sample_index(dataset: Dataset) -> IndexedDataset:
    """`dataset` whose dict items also hold their index under `"sample_index"` (see the module docstring)."""
    return IndexedDataset(dataset)

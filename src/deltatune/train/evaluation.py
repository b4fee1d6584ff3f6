"""Evaluation: mean task loss and accuracy, each process on its share of the data, sums all-reduced."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from deltatune.train.batches import SplitBatch
from deltatune.train.data_order import balanced_split
from deltatune.train.distributed import World, all_reduce_sum
from deltatune.train.losses import LossFn, logits_of


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, collate_fn: Callable[[list], Any], loss_fn: LossFn,
                   world: World, batch_size: int, to_device: Callable[[Any], SplitBatch]) -> dict[str, float]:
    """{"loss": mean of loss_fn over examples, "accuracy": share of argmax == label}; training mode restored."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss * n, correct, n
    shard = balanced_split(range(len(dataset)), world.size)[world.rank]
    try:
        for start in range(0, len(shard), batch_size):
            batch = to_device(collate_fn([dataset[i] for i in shard[start:start + batch_size]]))
            labels = batch.labels
            logits = logits_of(batch.run(model))
            count = torch.tensor(float(len(labels)), dtype=torch.float64, device=sums.device)
            sums += torch.stack([loss_fn(logits, labels).double() * count,
                                 (logits.argmax(dim=-1) == labels).sum().double(), count])
    finally:
        model.train(was_training)
    loss, correct, count = all_reduce_sum(sums, world).tolist()
    return {"loss": loss / count, "accuracy": correct / count}

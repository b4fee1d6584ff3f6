"""Evaluation: mean task loss and accuracy, each process on its share of the data, sums all-reduced."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from deltatune.core.model import set_training_mode
from deltatune.train.batches import SplitBatch
from deltatune.train.data_order import balanced_split
from deltatune.train.distributed import World, all_reduce_sum
from deltatune.train.losses import LossFn, batch_loss, find_logits


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, collate_fn: Callable[[list], Any], loss_fn: LossFn | None,
                   world: World, batch_size: int, to_device: Callable[[Any], SplitBatch],
                   labels_to_model: bool | None = None, lockstep: bool = False) -> dict[str, float]:
    """{"loss": the task loss (`losses.batch_loss`) averaged over examples, "accuracy": share of argmax == label};
    training mode restored.

    Accuracy is reported only when every batch has one class label per example (labels (B,) with logits (B, C));
    token-level labels (a causal LM's) and outputs without logits get the loss alone.

    `lockstep` (a sharded model, whose forward is a collective): every process runs as many batches as the
    process with the most; the extra ones are a placeholder example that is not counted."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=world.device)  # loss * n, correct, n classified, n
    shards = balanced_split(range(len(dataset)), world.size)
    shard = shards[world.rank]
    batches = math.ceil(max(len(s) for s in shards) / batch_size) if lockstep else math.ceil(len(shard) / batch_size)
    try:
        for start in range(0, batches * batch_size, batch_size):
            if start >= len(shard):  # lockstep only: keep the collective forwards in step
                batch_loss(model, to_device(collate_fn([dataset[0]])), loss_fn, labels_to_model)
                continue
            batch = to_device(collate_fn([dataset[i] for i in shard[start:start + batch_size]]))
            loss, outputs = batch_loss(model, batch, loss_fn, labels_to_model)
            count = float(len(batch.labels)) if batch.labels.dim() else 1.0
            correct, classified = _correct_predictions(find_logits(outputs), batch.labels)
            sums += torch.tensor([float(loss) * count, correct, classified, count], dtype=torch.float64,
                                 device=sums.device)
    finally:
        if was_training:
            set_training_mode(model)
    loss, correct, classified, count = all_reduce_sum(sums, world).tolist()
    metrics = {"loss": loss / count}
    if classified == count:
        metrics["accuracy"] = correct / count
    return metrics


def _correct_predictions(logits: Tensor | None, labels: Tensor) -> tuple[float, float]:
    """(correct, examples counted) for one class label per example; (0, 0) where accuracy has no meaning."""
    one_label_each = (logits is not None and logits.dim() == 2 and labels.dim() == 1
                      and not labels.is_floating_point() and labels.shape[0] == logits.shape[0])
    if not one_label_each:
        return 0.0, 0.0
    return float((logits.argmax(dim=-1) == labels).sum()), float(labels.shape[0])

"""Evaluation: mean task loss and accuracy, each process on its share of the data, sums all-reduced; and a
model's logits over a dataset (`model_logits`: the long-tail ensemble, merge-setting search)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from deltatune.core.model import set_training_mode
from deltatune.errors import ConfigError
from deltatune.train.batches import SplitBatch
from deltatune.train.data_order import balanced_split
from deltatune.train.distributed import World, all_reduce_sum
from deltatune.train.losses import LossFn, batch_loss, find_logits, logits_of


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


@torch.no_grad()
def model_logits(model: nn.Module, dataset: Dataset, collate_fn: Callable[[list], Any] | None = None,
                 batch_size: int = 256) -> Tensor:
    """Logits (N, C) of `model` over `dataset` in dataset order: eval mode (restored after), no gradient, on the
    model's device, returned on the CPU. Items are dicts (`labels` left out of the call) as in deltatune.data."""
    from deltatune.data.datasets import collate_dicts, model_inputs

    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ConfigError("cannot compute logits on an empty dataset: expected at least one example")
    collate_fn = collate_fn or collate_dicts
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
            batch = collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            inputs = {name: value.to(device) for name, value in model_inputs(batch).items()}
            chunks.append(logits_of(model(**inputs)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)

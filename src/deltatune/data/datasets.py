"""In-memory datasets of named tensors, the batch collate function, and an accuracy helper.

Batch convention (the trainer relies on it): an item or a batch is a dict of tensors; `labels` holds the integer
targets; the model is called as `model(**{k: v for k, v in batch.items() if k != "labels"})` and returns logits
of shape (B, num_classes).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from deltatune.errors import ConfigError, DeltatuneError

LABELS = "labels"


class TensorDictDataset(Dataset):
    """Tensors of equal length, indexed together: `dataset[i]` is `{name: tensor[i]}`.

    `texts` optionally keeps the raw strings of a text dataset (for reading examples; never batched).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], texts: Sequence[str] | None = None) -> None:
        lengths = {name: len(tensor) for name, tensor in tensors.items()}
        if LABELS not in tensors or len(set(lengths.values())) != 1:
            raise DeltatuneError(f"dataset tensors {lengths} are invalid: expected equal lengths and a '{LABELS}' key")
        if texts is not None and len(texts) != lengths[LABELS]:
            raise DeltatuneError(f"{len(texts)} texts for {lengths[LABELS]} labels: expected one text per example")
        self.tensors = dict(tensors)
        self.texts = tuple(texts) if texts is not None else None

    def __len__(self) -> int:
        return len(self.tensors[LABELS])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[LABELS]

    def subset(self, indices: Sequence[int]) -> TensorDictDataset:
        """A new dataset with the examples at `indices`, in that order."""
        positions = torch.as_tensor(list(indices), dtype=torch.long)
        texts = [self.texts[i] for i in positions.tolist()] if self.texts is not None else None
        return TensorDictDataset({name: tensor[positions] for name, tensor in self.tensors.items()}, texts)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches in dataset order, sliced directly (faster than a DataLoader for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield {name: tensor[start:start + batch_size] for name, tensor in self.tensors.items()}


def collate_dicts(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of `{name: tensor}` items into one batch `{name: stacked tensor}`."""
    if not items:
        raise DeltatuneError("cannot collate an empty list of examples: expected at least one item")
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model call: every batch entry except the labels."""
    return {name: value for name, value in batch.items() if name != LABELS}


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _batches(dataset: Dataset, batch_size: int) -> Iterable[Mapping[str, torch.Tensor]]:
    if isinstance(dataset, TensorDictDataset):
        return dataset.batches(batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_dicts)


def evaluate_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 128) -> float:
    """Share of `dataset` examples whose arg-max logit equals the label (no grad, eval mode, model's device).

    The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DeltatuneError("cannot evaluate on an empty dataset: expected at least one example")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for batch in _batches(dataset, batch_size):
                batch = {name: value.to(device) if device else value for name, value in batch.items()}
                predictions = model(**model_inputs(batch)).argmax(dim=-1)
                correct += int((predictions == batch[LABELS]).sum())
                total += len(batch[LABELS])
    finally:
        model.train(was_training)
    return correct / total

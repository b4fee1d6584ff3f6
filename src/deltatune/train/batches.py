"""The two batch conventions the trainer, evaluation and sensitivity scoring accept.

- a dict with a ``"labels"`` entry (the convention of `deltatune.data` and of transformers): the model is called
  as ``model(**rest)``;
- a tuple or list ``(inputs..., labels)`` (what a `TensorDataset` with the default collate gives): the model is
  called as ``model(*inputs)``, so a plain ``nn.Module`` trains without a wrapper.

A dict batch may also carry ``"sample_index"`` (int64 (B,), each example's index in its dataset; see
`deltatune.train.sample_index.with_sample_index`): it is taken out before the model is called and kept as
`SplitBatch.sample_index`, for losses that keep per-example state (PS-KD's previous-epoch predictions).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import TrainingError

LABELS = "labels"
SAMPLE_INDEX = "sample_index"


@dataclass(frozen=True)
class SplitBatch:
    """A batch split into the model's inputs, the labels and (when the batch carries it) each example's index in
    its dataset."""

    labels: Tensor
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    sample_index: Tensor | None = None

    def run(self, model: nn.Module, with_labels: bool = False) -> Any:
        """The model's outputs; `with_labels` also passes `labels=` (for models that compute their own loss)."""
        if with_labels:
            return model(*self.args, **self.kwargs, labels=self.labels)
        return model(*self.args, **self.kwargs)

    def to(self, device: torch.device | str) -> SplitBatch:
        def move(value: Any) -> Any:
            return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value

        return SplitBatch(move(self.labels), tuple(move(a) for a in self.args),
                          {k: move(v) for k, v in self.kwargs.items()}, move(self.sample_index))


def split_batch(batch: Any) -> SplitBatch:
    """Split a collated batch by the conventions of the module docstring; anything else is a TrainingError."""
    if isinstance(batch, Mapping) and LABELS in batch:
        return SplitBatch(batch[LABELS], kwargs={k: v for k, v in batch.items() if k not in (LABELS, SAMPLE_INDEX)},
                          sample_index=batch.get(SAMPLE_INDEX))
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        return SplitBatch(batch[-1], args=tuple(batch[:-1]))
    found = f"a dict with keys {list(batch)}" if isinstance(batch, Mapping) else f"a {type(batch).__name__}"
    raise TrainingError(f"a batch is {found}; expected a dict of tensors with a '{LABELS}' entry or a tuple "
                        "(inputs..., labels); fix the dataset items or the collate_fn")

"""The task loss: cross-entropy by default, plus the active deltas' regularizers."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import TrainingError

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the batch (custom loss functions must also return a batch mean)."""
    return F.cross_entropy(logits, labels)


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, an object with `.logits` (transformers), or a dict/tuple."""
    if isinstance(output, Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TrainingError(f"the model returned a {type(output).__name__}; expected logits (B, C), an object with "
                        "`.logits`, or a tuple starting with them; wrap the model so that forward returns logits")


def regularization(model: nn.Module) -> Tensor | None:
    """`deltatune.core.model.regularization_loss(model)` (the active deltas' regularizers, e.g. SaRA's nuclear
    norm); None when the core is not importable."""
    try:
        from deltatune.core.model import regularization_loss
    except ImportError:
        return None
    return regularization_loss(model)


def is_zero_constant(term: Tensor | None) -> bool:
    """True for a missing regularizer or a constant 0 (no graph): nothing to add to the loss."""
    return term is None or (not term.requires_grad and bool(torch.all(term == 0)))

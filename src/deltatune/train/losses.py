"""The task loss of a batch, plus the active deltas' regularizers.

Which loss a batch gets (`batch_loss`; the trainer, evaluation and SPT's sensitivity pass all use it):

1. a `loss_fn(outputs, labels)` given by the user: the model is called WITHOUT the labels and `loss_fn` gets what
   the model returned (a tensor, or a transformers ModelOutput with `.logits`, `.last_hidden_state`...) and the
   batch's labels; it must return the batch mean as a 0-dim tensor;
2. else, when the model's `forward` has a `labels` parameter (transformers' `...ForCausalLM`,
   `...ForSequenceClassification`...): the labels are passed to the model and its own `.loss` is used (token
   labels of a causal LM are shifted by the model, -100 ignored);
3. else classification cross-entropy of the logits (`cross_entropy`), whose shapes are checked first: labels that
   cannot fit the logits are a TrainingError naming both shapes and the fix (pass `loss_fn=`, for a causal LM
   `causal_lm_loss`).

A `loss_fn` whose signature names a `sample_index` parameter also gets the batch's sample indices (int64 (B,), or
None when the batch carries none: `batches.SAMPLE_INDEX`), for losses with per-example state (PS-KD).

A loss that is not a scalar tensor is a TrainingError; a NaN/inf loss is the trainer's to refuse (after the
all-reduce, before the update).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.errors import TrainingError

LossFn = Callable[[Any, Tensor], Tensor]
"""`loss_fn(outputs, labels) -> 0-dim tensor`: `outputs` is what the model returned, the result the batch mean
(`loss_fn(outputs, labels, sample_index=...)` when it names that parameter)."""

IGNORE_INDEX = -100  # the label transformers (and F.cross_entropy's default) leave out of the loss


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, an object with `.logits` (transformers), or a dict/tuple."""
    logits = find_logits(output)
    if logits is None:
        raise TrainingError(f"the model returned a {type(output).__name__} without logits; expected logits (B, C), "
                            "an object with `.logits`, or a tuple starting with them; pass loss_fn=(outputs, "
                            "labels) -> loss to use another output, or wrap the model so that forward returns logits")
    return logits


def find_logits(output: Any) -> Tensor | None:
    """`logits_of` without the error: None when the output holds no logits."""
    if isinstance(output, Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, Mapping):
        return output.get("logits")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def model_loss(output: Any) -> Tensor | None:
    """The loss a model computed itself (transformers' `.loss` when it was given labels), or None."""
    if isinstance(output, Tensor):
        return None
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss


def cross_entropy(outputs: Any, labels: Tensor) -> Tensor:
    """Mean classification cross-entropy of the logits in `outputs` (the default loss).

    Logits (B, C) with class indices (B,) or probabilities (B, C); extra dimensions as in `F.cross_entropy`
    (logits (B, C, d...) with labels (B, d...)). Other shapes are a TrainingError naming both."""
    logits = logits_of(outputs)
    check_classification_shapes(logits, labels)
    return F.cross_entropy(logits, labels)


def check_classification_shapes(logits: Tensor, labels: Tensor) -> None:
    """Refuse, by their shapes, labels that classification cross-entropy cannot pair with these logits."""
    if labels.is_floating_point():
        fits = labels.shape == logits.shape  # class probabilities
    else:
        fits = logits.dim() >= 1 and labels.shape == logits.shape[:1] + logits.shape[2:]
    if fits:
        return
    logits_shape, labels_shape = tuple(logits.shape), tuple(labels.shape)
    hint = ("these look like a causal LM's token labels: pass loss_fn=deltatune.train.causal_lm_loss, or a model "
            "whose forward takes labels (transformers' ...ForCausalLM)"
            if logits.dim() == 3 and labels.shape == logits.shape[:2] else
            "pass loss_fn=(outputs, labels) -> loss for this task")
    raise TrainingError(f"labels of shape {labels_shape} do not fit logits of shape {logits_shape} for the default "
                        f"classification cross-entropy (logits (B, C) with labels (B,)); {hint}")


def causal_lm_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict labels[:, t + 1]; labels equal to -100
    (padding, prompt tokens) are left out; the mean is over the counted tokens (transformers' rule)."""
    logits = logits_of(outputs)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise TrainingError(f"causal_lm_loss needs logits (B, T, V) and token labels (B, T); got logits "
                            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}; pass the matching loss_fn")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a softmax over the vocabulary in half precision loses the small probabilities
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)


def names_parameter(function: Any, name: str) -> bool:
    """True when `function`'s signature has a parameter `name` that can be passed by keyword."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get(name)
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def takes_labels(model: nn.Module) -> bool:
    """True when `model.forward` has a parameter named `labels` (then it computes its own loss from them)."""
    module = getattr(model, "module", model)  # DistributedDataParallel wraps the model as .module
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("labels")
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None,
               labels_to_model: bool | None = None) -> tuple[Tensor, Any]:
    """Run `model` on a `SplitBatch` and return (the task loss, the model's outputs), by the rules of the module
    docstring. `labels_to_model`: whether the model takes labels (default: `takes_labels(model)`)."""
    if loss_fn is None and (takes_labels(model) if labels_to_model is None else labels_to_model):
        outputs = batch.run(model, with_labels=True)
        own = model_loss(outputs)
        if own is not None:
            return check_loss(own, "the model's own loss (its .loss, computed from the labels)"), outputs
    else:
        outputs = batch.run(model)
    if loss_fn is None:
        return check_loss(cross_entropy(outputs, batch.labels), "the default cross-entropy"), outputs
    if names_parameter(loss_fn, "sample_index"):
        return check_loss(loss_fn(outputs, batch.labels, sample_index=batch.sample_index), "loss_fn"), outputs
    return check_loss(loss_fn(outputs, batch.labels), "loss_fn"), outputs


def check_loss(loss: Any, source: str) -> Tensor:
    """The loss as a 0-dim tensor; anything else (a float, a per-example vector) is a TrainingError."""
    if not isinstance(loss, Tensor):
        raise TrainingError(f"{source} returned a {type(loss).__name__}; expected a 0-dim tensor (the batch mean) "
                            "that autograd can differentiate")
    if loss.numel() != 1:
        raise TrainingError(f"{source} returned a tensor of shape {tuple(loss.shape)}; expected the batch mean, a "
                            "0-dim tensor; reduce it (e.g. loss.mean()) before returning it")
    return loss.reshape(())


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

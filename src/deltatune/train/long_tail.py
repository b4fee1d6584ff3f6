"""Long-tail adjustment: the logit-adjusted loss and the backdoor adjustment over backbones.

Chen et al., "Rethinking the Bias of Foundation Model under Long-tailed Distribution" (ICML 2025, arXiv
2501.15955; official code JiahaoChen1/Pre-train-Imbalance, read for facts). Two pieces, as the released code
computes them:

- **Training, once per backbone**: the logit-adjusted cross-entropy of Menon et al. (ICLR 2021),
  CE(z + τ·log π, y), with π the class frequencies of the training labels and τ = 1 (the paper's setting).
  Adding τ·log π before the softmax makes the head classes pay for their prior while training, so the raw logits z
  used at test time are (for τ = 1) balanced-error consistent. With uniform priors the shift is the same constant
  for every class and the loss is plain cross-entropy.
- **Test time**: the backdoor adjustment P(Y | do(X)) = Σ_z P(Y | X, z) P(z), with the strata z being different
  pre-trained backbones (their pre-training data give different "incomplete semantics"). The released code computes
  it as the SUM of the fine-tuned backbones' logits (uniform P(z); the same arg-max as their mean), which is what
  `logit_ensemble` returns. It is a logit ensemble over backbones; we name it after the paper's reading of it.

    loss = LogitAdjustedLoss.from_labels(train.labels, num_classes)      # τ = 1
    Trainer(model, config, train, loss_fn=loss).train()                   # once per backbone
    logits = logit_ensemble([vit, cnn], test)                             # (N, C): the sum of the two models' logits
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from deltatune.errors import ConfigError, TrainingError
from deltatune.train.evaluation import model_logits
from deltatune.train.losses import check_classification_shapes, logits_of

PAPER_TAU = 1.0  # τ of CE(z + τ log π) in the paper's configs (models/utils/losses.py of the official code)
PRIOR_SUM_TOLERANCE = 1e-6


def class_priors(labels: Tensor, num_classes: int) -> Tensor:
    """π_c = n_c / N, the class frequencies of integer training `labels` (float64, (num_classes,)).

    A class with no training example has prior 0 and log 0 = −inf: refused (its logit could never be adjusted);
    drop the class from the task, or pass smoothed priors to `LogitAdjustedLoss` yourself."""
    if labels.dim() != 1 or labels.is_floating_point() or labels.numel() == 0:
        raise ConfigError(f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype} are invalid for class "
                          "priors: expected a non-empty 1-D integer tensor of class indices")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ConfigError(f"labels range over [{int(labels.min())}, {int(labels.max())}], outside the "
                          f"{num_classes} classes [0, {num_classes - 1}]: pass the task's num_classes")
    counts = torch.bincount(labels.cpu(), minlength=num_classes).to(torch.float64)
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ConfigError(f"classes {missing} have no training example, so their prior is 0 and log π = −inf: "
                          "drop them from the task, or pass smoothed priors to LogitAdjustedLoss(priors=...)")
    return counts / counts.sum()


def check_priors(priors: Tensor) -> Tensor:
    """`priors` as a float64 copy after checking they are a probability vector with every entry > 0."""
    if not isinstance(priors, Tensor) or priors.dim() != 1 or priors.numel() < 2:
        raise ConfigError("priors are invalid: expected a 1-D tensor of at least 2 class probabilities "
                          f"(got {type(priors).__name__} of shape {tuple(getattr(priors, 'shape', ()))})")
    priors = priors.detach().to(torch.float64, copy=True).cpu()
    if not bool(torch.isfinite(priors).all()) or bool((priors <= 0).any()):
        raise ConfigError(f"priors {priors.tolist()} are invalid: every class prior must be finite and > 0 "
                          "(log π enters the logits); smooth zero counts, or drop the empty classes")
    total = float(priors.sum())
    if abs(total - 1.0) > PRIOR_SUM_TOLERANCE:
        raise ConfigError(f"priors sum to {total:.8g}, expected 1: pass frequencies (counts / counts.sum()), or "
                          "build the loss with LogitAdjustedLoss.from_labels")
    return priors


class LogitAdjustedLoss:
    """CE(z + τ·log π, y), the logit-adjusted loss (Menon et al. 2021, their Eq. 11; Chen et al. 2025's training
    loss with τ = 1). Usable as the Trainer's `loss_fn(outputs, labels)`.

    Only the loss sees the adjustment: the model's logits z are what evaluation and `logit_ensemble` use.
    `priors`: class probabilities, every one > 0, summing to 1 (`from_labels` computes them from the training
    labels). `tau` ≥ 0 (0 is plain cross-entropy)."""

    def __init__(self, priors: Tensor, tau: float = PAPER_TAU) -> None:
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau >= 0 or tau == float("inf"):
            raise ConfigError(f"tau={tau!r} is invalid: expected a finite number >= 0 (the paper's is 1.0)")
        self.priors = check_priors(priors)
        self.tau = float(tau)
        self.log_prior_shift = self.tau * self.priors.log()  # (C,) float64, moved to the logits' device per call

    @classmethod
    def from_labels(cls, labels: Tensor, num_classes: int, tau: float = PAPER_TAU) -> LogitAdjustedLoss:
        """The loss with π = the class frequencies of `labels` (the training split's)."""
        return cls(class_priors(labels, num_classes), tau)

    def adjusted_logits(self, logits: Tensor) -> Tensor:
        """z + τ·log π over the class dimension (dimension 1, as `F.cross_entropy` reads it)."""
        if logits.dim() < 2 or logits.shape[1] != self.priors.numel():
            raise TrainingError(f"logits of shape {tuple(logits.shape)} do not fit {self.priors.numel()} class "
                                "priors: expected (B, C, ...) with C the number of priors; build the loss from "
                                "this task's training labels and num_classes")
        shift = self.log_prior_shift.to(device=logits.device, dtype=logits.dtype)
        return logits + shift.view(1, -1, *([1] * (logits.dim() - 2)))

    def __call__(self, outputs: Any, labels: Tensor) -> Tensor:
        logits = logits_of(outputs)
        check_classification_shapes(logits, labels)
        return F.cross_entropy(self.adjusted_logits(logits), labels)

    def __repr__(self) -> str:
        return f"LogitAdjustedLoss(tau={self.tau}, classes={self.priors.numel()})"


def _ensemble_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count  # the released code's sum (uniform P(z), unnormalised: same arg-max as the mean)
    weights = [float(weight) for weight in weights]
    if len(weights) != count or not all(weight > 0 and weight != float("inf") for weight in weights):
        raise ConfigError(f"weights={weights} are invalid: expected {count} finite numbers > 0, one P(z) per "
                          "model (None: uniform, the paper's)")
    return weights


def logit_ensemble(models: Sequence[nn.Module], dataset: Dataset, *, weights: Sequence[float] | None = None,
                   collate_fn: Callable[[list], Any] | None = None, batch_size: int = 256) -> Tensor:
    """The paper's backdoor adjustment over backbones: Σ_z w_z · logits_z(x) for every example of `dataset`,
    (N, C) on the CPU. `weights` None is the released code's plain sum (uniform P(z)); otherwise one weight > 0
    per model (P(z), up to a factor). Every model must predict the same classes (equal C)."""
    if len(models) < 1:
        raise ConfigError("logit_ensemble needs at least one model: expected the fine-tuned backbones (the strata)")
    weights = _ensemble_weights(weights, len(models))
    total: Tensor | None = None
    for weight, model in zip(weights, models):
        logits = model_logits(model, dataset, collate_fn, batch_size)
        if total is not None and logits.shape != total.shape:
            raise ConfigError(f"the models' logits differ in shape ({tuple(total.shape)} vs {tuple(logits.shape)}): "
                              "ensemble only models fine-tuned on the same task (same classes)")
        total = weight * logits if total is None else total + weight * logits
    return total

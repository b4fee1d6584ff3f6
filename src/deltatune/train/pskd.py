"""PS-KD: self-knowledge distillation with progressively refined targets (Kim et al., ICCV 2021).

The model is its own teacher: at epoch t (0-based) of T, example i is trained against

    ỹ_i = (1 − α_t)·y_i + α_t·p_i^(t−1),        α_t = α_T·(t + 1)/T   (α_T = 0.8, the paper's)

with y_i its one-hot label and p_i^(t−1) the softmax the model gave it in the previous epoch (detached, no
temperature). In epoch 0 there is no previous prediction and ỹ_i = y_i (plain cross-entropy). The loss is the
batch mean of −Σ_c ỹ_ic·log softmax(z_i)_c. As in the official code (lgcnsai/PS-KD-Pytorch), predictions are kept
per dataset index in one (N, C) float32 table on the CPU, each row overwritten with the softmax of the forward
that was just trained on; since every example comes once per epoch, its row still holds the previous epoch's
prediction when it comes back. The targets depend only on the loss and the data, so PS-KD works on any model:
full fine-tuning or any delta method.

In `deltatune.train.Trainer` the object is both the loss and a callback (the callback tells it the epoch and
when a training step runs; evaluation gets plain cross-entropy), and the training items must carry their index::

    from deltatune.train import ProgressiveSelfKnowledgeDistillation, Trainer, with_sample_index
    pskd = ProgressiveSelfKnowledgeDistillation(num_samples=len(task.train))
    Trainer(model, config, with_sample_index(task.train), task.validation, loss_fn=pskd, callbacks=[pskd]).train()

A plain loop (T = epochs; `sample_index` from `with_sample_index` items)::

    pskd = ProgressiveSelfKnowledgeDistillation(num_samples=len(train), epochs=epochs)
    for epoch in range(epochs):
        for batch in loader:
            logits = model(pixels=batch["pixels"])
            loss = pskd.loss(logits, batch["labels"], batch["sample_index"], epoch)   # also records p^t
            optimizer.zero_grad(); loss.backward(); optimizer.step()

The Trainer records a step's predictions only at `on_step_end` (the first forward of each example in the step):
a failed step leaves the table as it was, and SAM's second pass, at perturbed weights, does not overwrite it.
The table and T travel in checkpoints (`state_dict`). Not supported under DistributedDataParallel yet (each
process would see only its share of the predictions): refused with a TrainingError. A transformers Trainer:
`deltatune.integrations.transformers.ProgressiveTargetsTrainer`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deltatune.errors import ConfigError, TrainingError
from deltatune.train.callbacks import Callback
from deltatune.train.losses import logits_of

PAPER_ALPHA_T = 0.8


def pskd_alpha(epoch: int, epochs: int, alpha_T: float = PAPER_ALPHA_T) -> float:
    """α_t = α_T·(t + 1)/T for epoch t in [0, T)."""
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ConfigError(f"epochs={epochs!r} is invalid: expected the number of training epochs T, an integer >= 1")
    if not (isinstance(epoch, int) and 0 <= epoch < epochs):
        raise ConfigError(f"epoch={epoch!r} is outside [0, {epochs}): PS-KD's α_t = α_T·(t+1)/T needs 0 <= t < T; "
                          "pass the 0-based epoch and the run's real number of epochs")
    return alpha_T * (epoch + 1) / epochs


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch mean of −Σ_c targets_c·log softmax(logits)_c (the official `Custom_CrossEntropy_PSKD`)."""
    return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class ProgressiveSelfKnowledgeDistillation(Callback):
    """PS-KD's loss and its per-example prediction table (see the module docstring).

    Args:
        num_samples: length of the training dataset (rows of the table; sample indices must be below it).
        alpha_T: α at the last epoch, in [0, 1] (0 is plain cross-entropy; 0.8 is the paper's).
        epochs: T; None takes it from the Trainer (total steps / steps per epoch, rounded up). Needed for
            `loss()` in a plain loop.
    """

    def __init__(self, num_samples: int, *, alpha_T: float = PAPER_ALPHA_T, epochs: int | None = None) -> None:
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ConfigError(f"num_samples={num_samples!r} is invalid: expected the training set's length, >= 1")
        if not (isinstance(alpha_T, (int, float)) and 0 <= alpha_T <= 1):
            raise ConfigError(f"alpha_T={alpha_T!r} is invalid: expected a weight in [0, 1] for the previous "
                              f"predictions (the paper's {PAPER_ALPHA_T}; 0 = plain cross-entropy)")
        if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
            raise ConfigError(f"epochs={epochs!r} is invalid: expected None (from the Trainer) or an integer >= 1")
        self.num_samples, self.alpha_T, self.epochs = num_samples, float(alpha_T), epochs
        self.predictions: Tensor | None = None  # (N, C) float32 on the CPU, made at the first batch
        self.seen = torch.zeros(num_samples, dtype=torch.bool)  # rows that hold a prediction
        self._epoch: int | None = None  # set by on_step_begin: inside a Trainer step
        self._pending: dict[int, Tensor] = {}

    # --- the defining equation ----------------------------------------------------------------------------
    def alpha(self, epoch: int) -> float:
        if self.epochs is None:
            raise ConfigError("PS-KD does not know T: pass epochs= to ProgressiveSelfKnowledgeDistillation (a "
                              "deltatune Trainer sets it at on_train_begin)")
        return pskd_alpha(epoch, self.epochs, self.alpha_T)

    def targets(self, labels: Tensor, sample_index: Tensor, epoch: int, num_classes: int) -> Tensor:
        """ỹ for these examples at `epoch`: one-hot in epoch 0 (and for an example never predicted before)."""
        index = self._check_index(sample_index, labels)
        alpha = self.alpha(epoch)
        one_hot = F.one_hot(labels.long(), num_classes).to(torch.float32)
        if epoch == 0 or self.predictions is None:
            return one_hot
        previous = self.predictions[index].to(one_hot.device)
        seen = self.seen[index].to(one_hot.device).unsqueeze(1)
        return torch.where(seen, (1 - alpha) * one_hot + alpha * previous, one_hot)

    def loss(self, logits: Tensor, labels: Tensor, sample_index: Tensor, epoch: int) -> Tensor:
        """The PS-KD loss of a batch at `epoch`, and its softmax recorded for the next epoch (plain loops)."""
        loss = self.step_loss(logits, labels, sample_index, epoch)
        self.commit()
        return loss

    def step_loss(self, logits: Tensor, labels: Tensor, sample_index: Tensor | None, epoch: int) -> Tensor:
        """The PS-KD loss of a batch at `epoch`; its softmax is held until `commit()` (a trainer's step end)."""
        if logits.dim() != 2:
            raise TrainingError(f"PS-KD needs logits (B, C) with one label per example; got {tuple(logits.shape)}")
        if sample_index is None:
            raise TrainingError("PS-KD got a training batch without sample indices; wrap the training set with "
                                "deltatune.train.with_sample_index(dataset) so each item carries its index")
        targets = self.targets(labels, sample_index, epoch, logits.shape[1])
        self._hold(sample_index, logits)
        return soft_cross_entropy(logits, targets)

    def _check_index(self, sample_index: Tensor, labels: Tensor) -> Tensor:
        index = sample_index.reshape(-1).long().cpu()
        if index.shape[0] != labels.shape[0]:
            raise TrainingError(f"{index.shape[0]} sample indices for {labels.shape[0]} labels; expected one index "
                                "per example (with_sample_index)")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise TrainingError(f"sample index {int(index.max())} is outside [0, {self.num_samples}); "
                                "num_samples must be the training set's length")
        return index

    def _hold(self, sample_index: Tensor, logits: Tensor) -> None:
        """Keep this forward's softmax until `commit`; the first forward of an example in a step wins."""
        probabilities = F.softmax(logits.detach().float(), dim=1).cpu()
        if self.predictions is None:
            self.predictions = torch.zeros(self.num_samples, logits.shape[1], dtype=torch.float32)
        elif self.predictions.shape[1] != logits.shape[1]:
            raise TrainingError(f"logits have {logits.shape[1]} classes but PS-KD's table has "
                                f"{self.predictions.shape[1]}; use one PS-KD object per task")
        for row, index in enumerate(sample_index.reshape(-1).tolist()):
            self._pending.setdefault(index, probabilities[row])

    def discard_pending(self) -> None:
        """Forget held predictions that were not committed (a new step begins)."""
        self._pending.clear()

    def commit(self) -> None:
        """Write the held predictions into the table (the Trainer does it at on_step_end)."""
        if not self._pending:
            return
        index = torch.tensor(list(self._pending), dtype=torch.long)
        self.predictions[index] = torch.stack(list(self._pending.values()))
        self.seen[index] = True
        self._pending.clear()

    # --- as the Trainer's loss_fn -------------------------------------------------------------------------
    def __call__(self, outputs: Any, labels: Tensor, sample_index: Tensor | None = None) -> Tensor:
        """PS-KD inside a Trainer step; plain cross-entropy elsewhere (evaluation)."""
        logits = logits_of(outputs)
        if self._epoch is None:
            return F.cross_entropy(logits, labels)
        return self.step_loss(logits, labels, sample_index, self._epoch)

    # --- as a Trainer callback ----------------------------------------------------------------------------
    def on_train_begin(self, progress: Any = None, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise TrainingError("PS-KD under DistributedDataParallel is not supported yet (each process would keep "
                                "only its share of the predictions); train on one process")
        if self.epochs is None and progress is not None:
            self.epochs = math.ceil(progress.total_steps / progress.steps_per_epoch)

    def on_step_begin(self, progress: Any = None, epoch: int = 0, **kwargs: Any) -> None:
        self.discard_pending()
        self._epoch = progress.epoch if progress is not None else epoch

    def on_step_end(self, **kwargs: Any) -> None:
        self.commit()
        self._epoch = None

    def state_dict(self) -> dict[str, Any]:
        empty = torch.zeros(0, 0)
        return {"predictions": empty if self.predictions is None else self.predictions, "seen": self.seen,
                "alpha_T": self.alpha_T, "epochs": -1 if self.epochs is None else self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        predictions = state["predictions"]
        self.predictions = None if predictions.numel() == 0 else predictions.to(torch.float32).cpu()
        self.seen = state["seen"].to(torch.bool).cpu()
        self.alpha_T = float(state["alpha_T"])
        self.epochs = None if int(state["epochs"]) < 0 else int(state["epochs"])

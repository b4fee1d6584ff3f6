"""HF Trainer checkpoints that keep the adapter.

The Trainer writes each checkpoint with ``save_pretrained``: base and delta tensors in one file, which a plain
``from_pretrained`` loads as the base model (the deltas are dropped). Add `SaveAdapterCallback` and every
checkpoint folder also holds the adapter alone, in deltatune's format::

    from deltatune.integrations.transformers import SaveAdapterCallback

    trainer = Trainer(model=adapted_model, args=args, ..., callbacks=[SaveAdapterCallback()])
    trainer.train()
    # <output_dir>/checkpoint-500/adapter/ and, at the end of training, <output_dir>/adapter/
    deltatune.load_adapter(fresh_base_model, "<output_dir>/checkpoint-500/adapter")

For a standalone model with the adapter folded in, use `deltatune.save_merged(model, path)`.

Update rules (`deltatune.optim`) go in as the Trainer's optimizer; the Trainer builds its scheduler on it::

    trainer = Trainer(model=adapted_model, args=args, ..., optimizers=update_rule_optimizers(adapted_model, args,
                                                                                             "lora_pro"))

SAM needs two forward/backward passes per step, which the Trainer's loop does not make: mix
`SharpnessAwareStep` in (``class SAMTrainer(SharpnessAwareStep, Trainer): pass``) and give it a SAM optimizer
(`update_rule_optimizers(model, args, "sam", rho=0.05)`).

Training strategies: PS-KD (`deltatune.train.pskd`) through `ProgressiveTargetsStep`, a mixin whose
`compute_loss` trains against the progressive targets, plus `ProgressiveTargetsCallback`, which records each
step's predictions; the items must carry `sample_index` (`deltatune.train.with_sample_index`)::

    class PSKDTrainer(ProgressiveTargetsStep, Trainer):
        pass

    pskd = ProgressiveSelfKnowledgeDistillation(num_samples=len(train))
    trainer = PSKDTrainer(model=model, args=args, train_dataset=with_sample_index(train),
                          callbacks=[ProgressiveTargetsCallback(pskd)])

Progressive unfreezing (`deltatune.train.ProgressiveUnfreezing`): `ProgressiveUnfreezingCallback(unfreeze)`.

transformers is imported by this module only, never by ``import deltatune``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from deltatune.core.state import save_adapter
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.optim.rules import build_update_rule
from deltatune.optim.sam import SAM
from deltatune.train.batches import SAMPLE_INDEX
from deltatune.train.losses import logits_of
from deltatune.train.pskd import ProgressiveSelfKnowledgeDistillation
from deltatune.train.unfreezing import ProgressiveUnfreezing

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - transformers is optional
    raise DeltatuneError(
        f"deltatune.integrations.transformers needs transformers ({error}); install it with pip install transformers"
    ) from None


class SaveAdapterCallback(TrainerCallback):
    """Write adapter `name` with `deltatune.save_adapter` into `<checkpoint>/<folder>` at every Trainer save,
    and into `<output_dir>/<folder>` when training ends (main process only)."""

    def __init__(self, name: str = "default", folder: str = "adapter", format: str = "deltatune") -> None:
        if not isinstance(folder, str) or not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise ConfigError(f"folder={folder!r} is invalid: expected a sub-folder name such as 'adapter'")
        self.name, self.folder, self.format = name, folder, format

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._save(state, model, Path(checkpoint) / self.folder)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._save(state, model, Path(args.output_dir) / self.folder)

    def _save(self, state: Any, model: Any, path: Path) -> None:
        if not state.is_world_process_zero:
            return
        if model is None:
            raise DeltatuneError("SaveAdapterCallback got no model from the Trainer; pass model= to Trainer")
        save_adapter(model, path, name=self.name, format=self.format)


def update_rule_optimizers(model: Any, args: Any, rule: str, **options: Any) -> tuple[torch.optim.Optimizer, None]:
    """`(optimizer, None)` for `Trainer(optimizers=...)`: update rule `rule` (`deltatune.optim.UPDATE_RULES`) over
    `model`'s trainable parameters at `args.learning_rate` and `args.weight_decay`; the Trainer adds its own
    scheduler (`args.lr_scheduler_type`, warm-up)."""
    return build_update_rule(rule, model, lr=args.learning_rate, weight_decay=args.weight_decay, **options), None


def _find_sam(optimizer: Any) -> SAM | None:
    """The SAM inside the Trainer's optimizer (accelerate wraps it in `.optimizer`), or None."""
    for _ in range(4):
        if isinstance(optimizer, SAM) or optimizer is None:
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class SharpnessAwareStep:
    """Mixin for a transformers Trainer whose optimizer is a `deltatune.optim.SAM`: each training step runs the
    batch at w (the gradient sets ε̂ = ρ·g/‖g‖), perturbs, runs it again at w + ε̂, and restores w, so the
    Trainer's clipping and `optimizer.step()` then act on the gradient at w + ε̂. With another optimizer it is
    the plain step. Gradient accumulation is refused (SAM's ε̂ needs the whole step's gradient).

        class SAMTrainer(SharpnessAwareStep, Trainer):
            pass

        trainer = SAMTrainer(model=model, args=args, train_dataset=data,
                             optimizers=update_rule_optimizers(model, args, "sam", rho=0.05))
    """

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        sam = _find_sam(getattr(self, "optimizer", None))
        if sam is None:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        accumulation = self.args.gradient_accumulation_steps  # type: ignore[attr-defined]
        if accumulation != 1:
            raise ConfigError(f"gradient_accumulation_steps={accumulation} with SAM is not supported; use 1 "
                              "(raise per_device_train_batch_size instead)")
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        sam.perturb()
        sam.zero_grad(set_to_none=True)
        with sam.second_pass():
            super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        sam.restore()
        return loss


class ProgressiveTargetsCallback(TrainerCallback):
    """Runs `pskd` (a `ProgressiveSelfKnowledgeDistillation`) in a transformers Trainer: T from the Trainer's
    epochs when `pskd.epochs` is None, the step's predictions written into its table at each step's end. Use it
    with a Trainer that mixes in `ProgressiveTargetsStep`."""

    def __init__(self, pskd: ProgressiveSelfKnowledgeDistillation) -> None:
        if not isinstance(pskd, ProgressiveSelfKnowledgeDistillation):
            raise ConfigError(f"ProgressiveTargetsCallback needs a ProgressiveSelfKnowledgeDistillation, got a "
                              f"{type(pskd).__name__}")
        self.pskd = pskd

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.pskd.epochs is None:
            self.pskd.epochs = max(1, math.ceil(state.num_train_epochs))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pskd.discard_pending()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.pskd.commit()


class ProgressiveTargetsStep:
    """Mixin for a transformers Trainer with a `ProgressiveTargetsCallback`: in training, `compute_loss` runs the
    model without labels and returns PS-KD's loss at the current epoch (`floor(state.epoch)`); in evaluation the
    Trainer's usual loss. `sample_index` and `labels` are kept by the Trainer's column filter, and `sample_index`
    is taken out of the inputs before the model is called."""

    loss_is_scaled_for_ga = False  # the PS-KD loss is a per-batch mean: the Trainer divides it for accumulation

    def _pskd(self) -> ProgressiveSelfKnowledgeDistillation:
        for callback in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, ProgressiveTargetsCallback):
                return callback.pskd
        raise ConfigError("ProgressiveTargetsStep needs a ProgressiveTargetsCallback(pskd) in the Trainer's "
                          "callbacks")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        for column in (SAMPLE_INDEX, "labels"):  # PS-KD reads both, even when forward takes neither
            if column not in self._signature_columns:  # type: ignore[attr-defined]
                self._signature_columns.append(column)  # type: ignore[attr-defined]

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        sample_index = inputs.pop(SAMPLE_INDEX, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        epoch = math.floor(self.state.epoch + 1e-6)  # type: ignore[attr-defined]
        loss = self._pskd().step_loss(logits_of(outputs), labels, sample_index, epoch)
        return (loss, outputs) if return_outputs else loss


class ProgressiveUnfreezingCallback(TrainerCallback):
    """A `deltatune.train.ProgressiveUnfreezing` schedule in a transformers Trainer: the stage of each step
    (`state.global_step`, `floor(state.epoch)`) is applied at its beginning; every parameter is trainable again
    at the end. Build the schedule before the Trainer (it reads the trainable set)."""

    def __init__(self, unfreezing: ProgressiveUnfreezing) -> None:
        if not isinstance(unfreezing, ProgressiveUnfreezing):
            raise ConfigError(f"ProgressiveUnfreezingCallback needs a ProgressiveUnfreezing, got a "
                              f"{type(unfreezing).__name__}")
        self.unfreezing = unfreezing

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.unfreezing.update(step=state.global_step, epoch=math.floor(state.epoch + 1e-6))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.unfreezing.restore()

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
(`update_rule_optimizers(model, args, "sam", rho=0.05)`). MGPO perturbs the base weights around the one pass:
`class MGPOTrainer(MomentumPerturbedStep, Trainer): pass` with `update_rule_optimizers(model, args, "mgpo")`
(its β1 is μ, not `args.adam_beta1`).

deltatune's own training callbacks (allocators' rank updates, SaRA re-selection, ID³, SNELLA: anything
`deltatune.train.Trainer` takes as `callbacks=`) run unchanged in the Trainer through `DeltatuneCallbacks`, and
the deltas' regularizers join the loss with the `RegularizedLoss` mixin::

    class DeltaTrainer(RegularizedLoss, Trainer):
        pass

    schedules = config.training_callbacks(adapted_model, total_steps=args.max_steps)
    trainer = DeltaTrainer(model=adapted_model, args=args, ...,
                           callbacks=[DeltatuneCallbacks(schedules), SaveAdapterCallback()])
    trainer.train()
    trainer.train(resume_from_checkpoint=True)   # the callbacks' decisions come back from the checkpoint

A Trainer checkpoint then holds, next to the Trainer's own files, `adapter/` (the adapter alone, for
`deltatune.load_adapter`) and `deltatune_callbacks.json` + `.safetensors` (the schedules' states).

The same pieces in a plain `accelerate` loop: call `deltatune.train.callbacks.fire(schedules, hook, ...)` at
the points listed in `DeltatuneCallbacks`, add `deltatune.regularization_loss(model)` to the loss, and save
`callback_states(schedules)` with `accelerator.save_state` (see tests/integrations/test_transformers_host.py).

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

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deltatune.core.state import save_adapter
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.optim.mgpo import MGPO
from deltatune.optim.rules import build_update_rule
from deltatune.optim.sam import SAM
from deltatune.train.batches import SAMPLE_INDEX
from deltatune.train.callbacks import callback_states, fire, load_callback_states
from deltatune.train.losses import is_zero_constant, logits_of, regularization
from deltatune.train.pskd import ProgressiveSelfKnowledgeDistillation
from deltatune.train.serialize import decode, encode
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


def _find(optimizer: Any, kind: type) -> Any:
    """The `kind` optimizer inside the Trainer's optimizer (accelerate wraps it in `.optimizer`), or None."""
    for _ in range(4):
        if isinstance(optimizer, kind) or optimizer is None:
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _find_sam(optimizer: Any) -> SAM | None:
    return _find(optimizer, SAM)


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


class MomentumPerturbedStep:
    """Mixin for a transformers Trainer whose optimizer is a `deltatune.optim.MGPO`: each `training_step`
    (forward and backward of one micro-batch) runs inside `optimizer.perturbed()`, so the base weights carry
    ε = −ρ·v/‖v‖·min(10, 1/ḡ) during it and are restored bit-exactly after, and ḡ is updated from the
    gradients then, as the official code's `training_step` does (per micro-batch under gradient accumulation).
    With another optimizer it is the plain step.

        class MGPOTrainer(MomentumPerturbedStep, Trainer):
            pass

        trainer = MGPOTrainer(model=model, args=args, train_dataset=data,
                              optimizers=update_rule_optimizers(model, args, "mgpo"))
    """

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        mgpo = _find(getattr(self, "optimizer", None), MGPO)
        if mgpo is None:
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        with mgpo.perturbed():
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]


CALLBACK_STATE = "deltatune_callbacks"


class DeltatuneCallbacks(TrainerCallback):
    """deltatune training callbacks (`deltatune.train.callbacks`) run inside a transformers Trainer.

    The hooks map onto the Trainer's loop so that each callback sees what it sees in `deltatune.train.Trainer`:
    on_step_begin at the Trainer's on_step_begin; on_backward_end at on_pre_optimizer_step (the step's gradients
    are accumulated; unlike deltatune's loop the Trainer has clipped them already); on_step_end at
    on_optimizer_step (after optimizer.step, before the Trainer zeroes `.grad`, with `global_step` the count
    after this step); on_epoch_end, on_evaluate (with `metrics`), on_train_begin and on_train_end at theirs.
    `progress` is this object: a callback's `progress.request_stop()` sets the Trainer's should_training_stop.

    The callbacks' states (ranks, masks, RNG) go into every checkpoint as `deltatune_callbacks.json` +
    `.safetensors`, and come back when the Trainer resumes from `<output_dir>/checkpoint-<step>`.
    """

    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks = list(callbacks)
        self._stop = False

    def request_stop(self) -> None:
        """What a callback calls on `progress` to stop training after this step."""
        self._stop = True

    def _context(self, state: Any, model: Any, kwargs: dict[str, Any], step: int | None) -> dict[str, Any]:
        return dict(progress=self, model=model, optimizer=kwargs.get("optimizer"),
                    scheduler=kwargs.get("lr_scheduler"), epoch=int(state.epoch or 0),
                    global_step=state.global_step if step is None else step)

    def _fire(self, hook: str, state: Any, control: Any, model: Any, kwargs: dict[str, Any],
              step: int | None = None, **extra: Any) -> None:
        fire(self.callbacks, hook, **extra, **self._context(state, model, kwargs, step))
        if self._stop:
            control.should_training_stop = True

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step > 0:  # the Trainer resumed: restore the callbacks' decisions of that checkpoint
            self._load(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._fire("on_train_begin", state, control, model, kwargs)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._fire("on_step_begin", state, control, model, kwargs)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._fire("on_backward_end", state, control, model, kwargs)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._fire("on_step_end", state, control, model, kwargs, step=state.global_step + 1)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._fire("on_epoch_end", state, control, model, kwargs)

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._fire("on_evaluate", state, control, model, kwargs, metrics=kwargs.get("metrics", {}))

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._fire("on_train_end", state, control, model, kwargs)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._save(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _save(self, folder: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        structure = encode(callback_states(self.callbacks), "callbacks", tensors)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{CALLBACK_STATE}.json").write_text(json.dumps(structure))
        save_file(tensors, str(folder / f"{CALLBACK_STATE}.safetensors"))

    def _load(self, folder: Path) -> None:
        structure_file = folder / f"{CALLBACK_STATE}.json"
        if not structure_file.is_file():
            raise DeltatuneError(f"{folder} holds no {CALLBACK_STATE}.json; resume from a checkpoint written with "
                                 "DeltatuneCallbacks in the Trainer's callbacks, under args.output_dir")
        tensors = load_file(str(folder / f"{CALLBACK_STATE}.safetensors"))
        load_callback_states(self.callbacks, decode(json.loads(structure_file.read_text()), tensors), str(folder))


class RegularizedLoss:
    """Mixin for a transformers Trainer: adds `deltatune.regularization_loss(model)` (the active deltas'
    regularizers and penalties, e.g. SaRA's nuclear norm) to the training loss, divided by the accumulation
    steps on each micro-batch (once per optimizer step in total, as in `deltatune.train.Trainer`). Evaluation
    losses stay the task loss.

        class DeltaTrainer(RegularizedLoss, Trainer):
            pass
    """

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)  # type: ignore[misc]
        if not model.training:
            return result
        term = regularization(getattr(model, "module", model))
        if is_zero_constant(term):
            return result
        share = term / self.args.gradient_accumulation_steps  # type: ignore[attr-defined]
        if return_outputs:
            return result[0] + share, result[1]
        return result + share

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

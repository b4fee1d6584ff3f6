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

transformers is imported by this module only, never by ``import deltatune``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deltatune.core.state import save_adapter
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.optim.rules import build_update_rule
from deltatune.optim.sam import SAM

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

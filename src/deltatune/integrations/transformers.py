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
transformers is imported by this module only, never by ``import deltatune``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deltatune.core.state import save_adapter
from deltatune.errors import ConfigError, DeltatuneError

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

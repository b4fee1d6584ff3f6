"""Guards on the methods of an adapted model that would lose or break its adapters without a word.

transformers models bring two such methods, found here by name only (no transformers import):

- ``save_pretrained`` writes the base weights and the delta tensors into one file, and a plain
  ``from_pretrained`` of that folder drops the deltas and hands back the base model. The guard warns once per
  model, naming the two paths that work: `deltatune.save_adapter` (the adapter alone; for HF Trainer
  checkpoints, `deltatune.integrations.transformers.SaveAdapterCallback`) and `deltatune.save_merged` (a
  standalone model with the adapter folded in). It then saves as asked.
- ``resize_token_embeddings`` replaces an adapted embedding or head with a plain layer (the deltas vanish) or
  fails half-way with a TypeError. The guard refuses before anything changes, naming the adapted module.

`adapt` installs the guards on the model object (an instance attribute shadowing the class method, so a deep
copy carries them); `unload` removes them.
"""
from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from torch import nn

from deltatune.core.host import AdaptedLayer
from deltatune.errors import TargetError

_WARNED: weakref.WeakSet = weakref.WeakSet()
SAVE_PRETRAINED_WARNING = (
    "save_pretrained of an adapted model writes base and delta tensors into one file, and a plain "
    "from_pretrained of it silently drops the deltas (you get the base model back): save the adapter with "
    "deltatune.save_adapter(model, path) (HF Trainer checkpoints: add "
    "deltatune.integrations.transformers.SaveAdapterCallback()), or a standalone merged model with "
    "deltatune.save_merged(model, path)"
)


def _is_adapted(model: nn.Module) -> bool:
    return any(isinstance(module, AdaptedLayer) for module in model.modules())


def _save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    if _is_adapted(self) and self not in _WARNED:
        _WARNED.add(self)
        warnings.warn(SAVE_PRETRAINED_WARNING, UserWarning, stacklevel=2)
    return type(self).save_pretrained(self, *args, **kwargs)


def _resize_token_embeddings(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(self, getter)()
        if isinstance(module, AdaptedLayer):
            path = next(p for p, m in self.named_modules() if m is module)
            raise TargetError(
                f"cannot resize token embeddings: {path!r} is adapted and its deltas are sized for the current "
                "vocabulary; resize before deltatune.adapt, or deltatune.unload(model) (merge) first, resize, "
                "then adapt again"
            )
    return type(self).resize_token_embeddings(self, *args, **kwargs)


_save_pretrained.__name__ = "save_pretrained"
_resize_token_embeddings.__name__ = "resize_token_embeddings"
_GUARDS: dict[str, Callable[..., Any]] = {
    "save_pretrained": _save_pretrained,
    "resize_token_embeddings": _resize_token_embeddings,
}


def install_guards(model: nn.Module) -> None:
    """Shadow the model's guarded methods (those its class has) with their guards."""
    for name, guard in _GUARDS.items():
        if callable(getattr(type(model), name, None)) and name not in model.__dict__:
            object.__setattr__(model, name, types.MethodType(guard, model))


def remove_guards(model: nn.Module) -> None:
    for name, guard in _GUARDS.items():
        installed = model.__dict__.get(name)
        if isinstance(installed, types.MethodType) and installed.__func__ is guard:
            object.__delattr__(model, name)

"""Trainer callbacks: hooks into the loop for allocators, schedules and logging.

Hooks are called with keyword arguments only, so a callback declares just what it reads and ends with
`**kwargs`:

    trainer, model, optimizer, scheduler, global_step, epoch      (every hook)
    metrics                                                      (on_evaluate)

`model` is the plain model (never the DistributedDataParallel wrapper). `global_step` counts optimizer steps
already taken: on_step_begin and on_backward_end see the index of the step being built (0 for the first),
on_step_end sees the count after it (1 after the first step). Order within one optimizer step:

    on_step_begin -> forward/backward of every micro-batch (gradients all-reduced across processes)
    -> on_backward_end (read gradients here: importance scores) -> clipping -> optimizer.step
    -> scheduler.step -> on_step_end

Gradients are zeroed at the start of each step (after on_step_begin), so at on_step_end `.grad` still holds
the (clipped) gradients the optimizer just used; allocators rely on this.

on_epoch_end follows the last step of an epoch and its evaluation; on_train_end follows the final checkpoint.
A callback stops training cleanly (final checkpoint written, resumable) with `trainer.request_stop()`.

`state_dict()` / `load_state_dict()` carry a callback's decisions (ranks, masks, RNG) through checkpoints:
return tensors, numbers, strings, lists, tuples and dicts (encoded without pickle). Any object with some of
these methods works as a callback; subclassing `Callback` only provides the no-op defaults.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HOOKS = ("on_train_begin", "on_step_begin", "on_backward_end", "on_step_end", "on_epoch_end", "on_evaluate",
         "on_train_end")


class Callback:
    """No-op base class; override the hooks you need (each takes keyword arguments, see the module doc)."""

    def on_train_begin(self, **kwargs: Any) -> None: ...

    def on_step_begin(self, **kwargs: Any) -> None: ...

    def on_backward_end(self, **kwargs: Any) -> None: ...

    def on_step_end(self, **kwargs: Any) -> None: ...

    def on_epoch_end(self, **kwargs: Any) -> None: ...

    def on_evaluate(self, **kwargs: Any) -> None: ...

    def on_train_end(self, **kwargs: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def callback_key(index: int, callback: Any) -> str:
    """A callback's name in checkpoints: its position and class (resuming with other callbacks is an error)."""
    return f"{index}:{type(callback).__name__}"


def fire(callbacks: Sequence[Any], hook: str, **context: Any) -> None:
    """Call `hook` on every callback that has it, in order."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(**context)


def is_stateful(callback: Any) -> bool:
    return hasattr(callback, "state_dict") and hasattr(callback, "load_state_dict")


def callback_states(callbacks: Sequence[Any]) -> dict[str, Any]:
    return {callback_key(i, c): c.state_dict() for i, c in enumerate(callbacks) if is_stateful(c)}

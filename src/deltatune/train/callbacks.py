"""Trainer callbacks: hooks into the loop for allocators, schedules and logging.

Hooks are called with keyword arguments only, so a callback declares just what it reads and ends with
`**kwargs`:

    progress, model, optimizer, scheduler, global_step, epoch     (every hook)
    metrics                                                      (on_evaluate)

`progress` is the run's `deltatune.train.progress.TrainingProgress` (step, epoch, position in the epoch,
total_steps, last evaluation and checkpoint); `global_step` and `epoch` repeat two of its fields.

`model` is the plain model (never the DistributedDataParallel wrapper). `global_step` counts optimizer steps
already taken: on_step_begin and on_backward_end see the index of the step being built (0 for the first),
on_step_end sees the count after it (1 after the first step). Order within one optimizer step:

    on_step_begin -> forward/backward of every micro-batch (gradients all-reduced across processes)
    -> on_backward_end (read gradients here: importance scores) -> clipping -> optimizer.step
    -> scheduler.step -> on_step_end

Gradients are zeroed at the start of each step (after on_step_begin), so at on_step_end `.grad` still holds
the (clipped) gradients the optimizer just used; allocators rely on this.

on_epoch_end follows the last step of an epoch and its evaluation; on_train_end follows the final checkpoint.
A callback stops training cleanly (final checkpoint written, resumable) with `progress.request_stop()`.

Callbacks written before `progress` existed read `trainer`: a hook whose signature names a `trainer` parameter
still gets the Trainer (`trainer.request_stop()`, `trainer.total_steps`, ... keep working); other hooks do not,
so a hook that read `kwargs["trainer"]` must now name the parameter, or better, read `progress`.

`state_dict()` / `load_state_dict()` carry a callback's decisions (ranks, masks, RNG) through checkpoints:
return tensors, numbers, strings, lists, tuples and dicts (encoded without pickle). Any object with some of
these methods works as a callback; subclassing `Callback` only provides the no-op defaults.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from deltatune.errors import TrainingError

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
    """Call `hook` on every callback that has it, in order, with `context` as keyword arguments; a `trainer` in
    the context goes only to hooks that name that parameter (see the module docstring)."""
    trainer = context.pop("trainer", None)
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is None:
            continue
        if trainer is not None and names_trainer(method):
            method(trainer=trainer, **context)
        else:
            method(**context)


def names_trainer(method: Any) -> bool:
    """True when `method` declares a parameter called `trainer` (the callback API before `progress`)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin without a signature: it cannot name one
        return False
    parameter = parameters.get("trainer")
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def is_stateful(callback: Any) -> bool:
    return hasattr(callback, "state_dict") and hasattr(callback, "load_state_dict")


def callback_states(callbacks: Sequence[Any]) -> dict[str, Any]:
    return {callback_key(i, c): c.state_dict() for i, c in enumerate(callbacks) if is_stateful(c)}


def check_callback_states(callbacks: Sequence[Any], states: dict[str, Any], source: str) -> None:
    """The stateful callbacks must be those that wrote `states`, in the same order."""
    current = sorted(callback_key(i, c) for i, c in enumerate(callbacks) if is_stateful(c))
    if sorted(states) != current:
        raise TrainingError(f"{source} holds callback states {sorted(states)} but the trainer has {current}; "
                            "pass the same callbacks, in the same order, to resume")


def load_callback_states(callbacks: Sequence[Any], states: dict[str, Any], source: str) -> None:
    """Inverse of `callback_states` (after `check_callback_states`)."""
    check_callback_states(callbacks, states, source)
    for index, callback in enumerate(callbacks):
        if is_stateful(callback):
            callback.load_state_dict(states[callback_key(index, callback)])

"""The allocator base class and its trainer callback.

An allocator binds to one adapter's deltas that have the capabilities it needs (`allocate.protocols`), and is
stepped once per optimizer step. In a plain loop, two lines::

    optimizer.step()
    allocator.step(model, global_step, optimizer)   # global_step = optimizer steps so far (1 after the first)

then `zero_grad()`. Allocators that add components give them a new parameter's optimizer state
(`fresh_state`): pass the optimizer (or call `allocator.attach_optimizer(optimizer)` before the first step;
after resuming from a checkpoint, before the first resumed step).

With the deltatune trainer, `allocator.callback()` (or the method config's `training_callbacks`) does the same
at `on_step_end`. Gradient accumulation needs nothing more: the allocator only reads the summed gradients of a
whole optimizer step (and IncreLoRA's probe sums its records over the micro-batches).

Decisions live in the deltas' persistent buffers (`rank_mask`, ...), so adapter files and training checkpoints
carry them; the allocator's own state (EMAs, counters) goes through `state_dict` / `load_state_dict`.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.allocate.protocols import HasRankComponents
from deltatune.core.model import adapter_state, iter_deltas
from deltatune.errors import DeltatuneError


class AllocationError(DeltatuneError, ValueError):
    """An allocator cannot run as asked (no adaptive deltas, steps out of range, missing gradients...)."""


def find_capable_deltas(model: nn.Module, adapter: str, required: tuple[type, ...]) -> dict[str, nn.Module]:
    """Module path -> delta for adapter `adapter`'s deltas that implement every protocol in `required`."""
    if adapter not in adapter_state(model).configs:
        known = ", ".join(adapter_state(model).configs) or "none"
        raise AllocationError(f"no adapter named {adapter!r} on this model (adapters: {known}); pass adapter=")
    found = {path: delta for path, _, delta in iter_deltas(model, adapter)
             if all(isinstance(delta, protocol) for protocol in required)}
    if not found:
        needs = ", ".join(p.__name__ for p in required)
        raise AllocationError(
            f"adapter {adapter!r} has no deltas with {needs}: an allocator needs a budget-adaptive method; "
            "adapt the model with such a method (see `deltatune methods`) before attaching it"
        )
    return found


def warn_no_gradient(module: str, step: int, warned: set[str]) -> None:
    """Warn once per module (tracked in `warned`) that `module` got no gradient and counts as unimportant."""
    if module in warned:
        return
    warned.add(module)
    warnings.warn(f"{module} got no gradient at step {step} (the loss does not reach it): the allocator scores what "
                  f"got none as 0 while this lasts; if the module is not used, leave it out (exclude=[{module!r}])",
                  stacklevel=4)


class Allocator:
    """Base class: subclasses implement `_step(global_step)` and extend `state_dict`/`load_state_dict`."""

    required: ClassVar[tuple[type, ...]] = (HasRankComponents,)

    def __init__(self, model: nn.Module, total_steps: int, adapter: str = "default") -> None:
        self._model = weakref.ref(model)
        self.adapter = adapter
        self.total_steps = total_steps
        self.deltas = find_capable_deltas(model, adapter, self.required)
        self.last_step = 0
        self._captured: dict[int, Tensor] = {}
        self._current_step = 0
        self._warned_no_gradient: set[str] = set()

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise AllocationError("the model this allocator was built for no longer exists")
        return model

    # --- the training-loop entry points ---------------------------------------------------------------------
    def capture_gradients(self) -> None:
        """Copy the current gradients of every component tensor (call after the accumulated backward)."""
        self._captured = {
            id(p): p.grad.detach().clone() for p in self._component_parameters() if p.grad is not None
        }

    @torch.no_grad()
    def step(self, model: nn.Module, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Update importance and apply this step's allocation decision. Call after `optimizer.step()` and
        before `zero_grad()`, with the number of optimizer steps taken so far (and the optimizer, which
        `attach_optimizer` then hooks)."""
        if model is not self.model:
            raise AllocationError("allocator.step got a different model than the one the allocator was built for")
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 1:
            raise AllocationError(f"global_step={global_step!r} is invalid: pass the number of optimizer steps "
                                  "taken so far (1 after the first optimizer.step())")
        if global_step > self.total_steps:
            raise AllocationError(
                f"global_step={global_step} is beyond total_steps={self.total_steps} that this allocator was "
                "built for; build it with the real training length"
            )
        self._current_step = global_step
        if optimizer is not None:
            self.attach_optimizer(optimizer)
        self._before_step()
        try:
            self._step(global_step)
        finally:
            self._captured = {}
        self.last_step = global_step

    def _step(self, global_step: int) -> None:
        raise NotImplementedError

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer that trains the model (allocators that add components give them fresh state in it,
        `fresh_state.FreshSlotAllocator`); call before its first step. Nothing to do here."""

    def _before_step(self) -> None:
        """Checks before this step's decision (none here)."""

    def gradient(self, parameter: Tensor, name: str = "", module: str | None = None) -> Tensor:
        """The gradient of a component tensor for this step: the captured copy, else the live `.grad`.

        A tensor without one while other component tensors have theirs belongs to a module the loss did not reach
        (BERT's pooler under a loss on `last_hidden_state`): its gradient is zero for this step, and a warning
        names `module` once. No gradient anywhere is a call-order mistake (stepped after `zero_grad`)."""
        captured = self._captured.get(id(parameter))
        if captured is not None:
            return captured
        if parameter.grad is not None:
            return parameter.grad
        if not self._any_gradient():
            raise AllocationError(
                f"no gradient for {name or 'a component tensor'}: call allocator.step after loss.backward() and "
                "optimizer.step(), before optimizer.zero_grad()"
            )
        warn_no_gradient(module or name, self._current_step, self._warned_no_gradient)
        return torch.zeros_like(parameter)

    def _any_gradient(self) -> bool:
        return bool(self._captured) or any(p.grad is not None for p in self._component_parameters())

    def _component_parameters(self) -> list[Tensor]:
        return [p for delta in self.deltas.values() for p, _ in delta.component_tensors().values()]

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])

    def callback(self, capture: bool = False) -> AllocatorCallback:
        return AllocatorCallback(self, capture)

    def describe(self) -> dict[str, int]:
        """Module path -> live rank."""
        return {path: delta.rank for path, delta in self.deltas.items()}

    @property
    def total_rank(self) -> int:
        return sum(delta.rank for delta in self.deltas.values())


class AllocatorCallback:
    """Trainer callback around an allocator: step it after every optimizer step (`on_step_end`).

    The deltatune trainer zeroes gradients at the start of the next step, so at `on_step_end` the gradients are
    those the optimizer just used (after clipping), as in the official code and peft. For a trainer that zeroes
    them earlier, pass `capture=True`: the gradients are then copied at `on_backward_end` (before clipping)."""

    def __init__(self, allocator: Allocator, capture: bool = False) -> None:
        self.allocator = allocator
        self.capture = capture

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        # before the first optimizer step, and after a resume has restored the optimizer's state
        if kwargs.get("optimizer") is not None:
            self.allocator.attach_optimizer(kwargs["optimizer"])

    def on_backward_end(self, *args: Any, **kwargs: Any) -> None:
        if self.capture:
            self.allocator.capture_gradients()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.allocator.step(self.allocator.model, _global_step(args, kwargs), kwargs.get("optimizer"))

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocator.load_state_dict(state)


def _global_step(args: tuple, kwargs: dict) -> int:
    """The deltatune trainer passes `global_step=` (and `progress`); other loops may pass an object with a
    `global_step` (transformers' TrainerState as `state`, or a trainer)."""
    if "global_step" in kwargs:
        return int(kwargs["global_step"])
    for candidate in (*args, kwargs.get("progress"), kwargs.get("trainer"), kwargs.get("state")):
        if candidate is not None and hasattr(candidate, "global_step"):
            return int(candidate.global_step)
    raise AllocationError("the trainer called on_step_end without a global_step; pass global_step= or the trainer")

"""A model used strictly as a black box: forward only, outputs detached, no parameters, every query counted.

    box = BlackBox(model, output="probabilities", budget=100_000)
    probabilities = box(pixels)          # counts pixels.shape[0] queries
    box.queries, box.calls               # examples and batches sent so far

`BlackBox` is what a black-box method (BlackVIP, `deltatune.train.blackvip`) sees of its target: a function from
inputs to outputs. It puts the model in eval mode and freezes it once (requires_grad False on every parameter),
then runs every call under `torch.inference_mode()` on a detached copy of the input, so no autograd graph can
reach the model and no gradient can flow back from its outputs. It is not an `nn.Module` and holds the model only
inside a closure: `parameters()`, `state_dict()`, `modules()` and any other attribute it does not define are
refused with `BlackBoxAccessError`, so code written against it cannot read or move the weights by accident. (It
is a guard against mistakes, not a sandbox: Python can always reach a closure's cells.)

Queries: one query is one example through the model's forward; each call counts its batch. With `budget`, a
call that would pass it is refused with `QueryBudgetError` before the model runs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import DeltatuneError, config_check

OUTPUTS = ("logits", "probabilities")


class BlackBoxAccessError(DeltatuneError, AttributeError):
    """Code asked a black box for something other than its outputs (parameters, modules, gradients)."""


class QueryBudgetError(DeltatuneError, RuntimeError):
    """A black box was queried past its budget."""


def _forward_only(model: nn.Module, output: str) -> Callable[[Tensor], Tensor]:
    """The model as a function of its input: eval mode, frozen, inference mode, outputs detached copies."""
    model.eval()
    model.requires_grad_(False)
    device = next((p.device for p in model.parameters()), None)

    def query(inputs: Tensor) -> Tensor:
        with torch.inference_mode():
            result = model(inputs.detach().to(device) if device is not None else inputs.detach())
            logits = getattr(result, "logits", result)
            result = logits.softmax(dim=-1) if output == "probabilities" else logits
        # a clone made outside inference mode is an ordinary tensor (inference tensors refuse in-place ops later)
        return result.clone().to(inputs.device)

    return query


class BlackBox:
    """A forward-only view of a model that counts its queries (see the module docstring)."""

    __slots__ = ("_query", "output", "budget", "queries", "calls")

    def __init__(self, model: nn.Module, output: str = "logits", budget: int | None = None) -> None:
        config_check(output in OUTPUTS, "output", output, f"one of {OUTPUTS}")
        config_check(budget is None or budget >= 0, "budget", budget, "a number of queries >= 0, or None")
        self._query = _forward_only(model, output)
        self.output = output
        self.budget = budget
        self.queries = 0
        self.calls = 0

    def __call__(self, inputs: Tensor) -> Tensor:
        batch = int(inputs.shape[0])
        if self.budget is not None and self.queries + batch > self.budget:
            raise QueryBudgetError(f"this black box allows {self.budget:,} queries and {self.queries:,} are spent; "
                                   f"a batch of {batch} would pass the budget: raise budget= or stop earlier")
        self.queries += batch
        self.calls += 1
        return self._query(inputs)

    def remaining(self) -> int | None:
        """Queries left under the budget (None: no budget)."""
        return None if self.budget is None else self.budget - self.queries

    def __getattr__(self, name: str) -> Any:
        raise BlackBoxAccessError(f"a black box exposes only its outputs, not {name!r}: call it on inputs "
                                  "(box(x)); to train the model itself, use it as a white-box model instead")

    # nn.Module's readers, refused by name so that the message says why rather than "no attribute"
    def parameters(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("parameters")

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("named_parameters")

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("state_dict")

    def modules(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("modules")

    def __repr__(self) -> str:
        budget = "no budget" if self.budget is None else f"budget {self.budget:,}"
        return f"BlackBox(output={self.output!r}, {self.queries:,} queries in {self.calls:,} calls, {budget})"

"""SAM — sharpness-aware minimization (Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for
Efficiently Improving Generalization", ICLR 2021, arXiv:2010.01412), as a shared update rule over any base
optimizer and so any delta method.

SAM minimises max_{‖ε‖₂ ≤ ρ} L(w + ε). Its first-order solution (the paper's Eq. 2 with p = 2) and the update
(Eq. 3, dropping the second-order term) are

    ε̂(w) = ρ · g / ‖g‖₂,       g = ∇L(w)  (one norm over every trainable tensor)
    w ← base_step(w, ∇L(w)|_{w + ε̂(w)})

so each step runs two forward/backward passes on the same batch: the first at w (its gradient only sets the
direction of ε̂), the second at w + ε̂; the base optimizer (AdamW by default) then steps from w with the second
gradient. ρ = 0.05 by default (the paper's typical value; the three-regime pruning study sweeps 0.1 to 0.8).

Batch-norm running statistics are updated by the first pass only, when SAM knows the model
(`SAM(base, rho, model=model)`; the registry passes it): the second pass runs with the norms' momentum at 0,
as the three-regime pruning study's code does.

Use: `SAM(base_optimizer, rho)`. `step(closure)` needs a closure that zeroes nothing itself and recomputes the
loss and its gradients at the current parameters (`loss.backward()`), as torch's LBFGS closure does; deltatune's
Trainer passes one (`TrainConfig(update_rule="sam")`), a plain loop writes it (see `SAM`), and a transformers
Trainer uses `deltatune.integrations.transformers.SharpnessAwareStep`, which runs both passes in
`training_step` (`perturb` / `restore`) so that the Trainer's `optimizer.step()` needs no closure.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from deltatune.errors import TrainingError, config_check

DEFAULT_RHO = 0.05


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around `base` (any torch optimizer; it shares this optimizer's parameter
    groups, so a learning-rate scheduler built on SAM drives it). A plain loop:

        optimizer = SAM(torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.05)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        closure()                  # the gradient at w
        optimizer.step(closure)    # ε̂ from it, the gradient at w + ε̂, the base step from w
    """

    needs_closure = True  # `deltatune.optim.NeedsClosure`: the Trainer passes a closure that recomputes gradients

    def __init__(self, base: torch.optim.Optimizer, rho: float = DEFAULT_RHO, model: nn.Module | None = None) -> None:
        config_check(isinstance(rho, (int, float)) and not isinstance(rho, bool) and rho > 0, "rho", rho,
                     "a perturbation radius ρ > 0 (the paper's typical value is 0.05)")
        if not isinstance(base, torch.optim.Optimizer):
            raise TrainingError(f"SAM's base is a {type(base).__name__}; expected a torch.optim.Optimizer "
                                "(e.g. torch.optim.AdamW(params, lr=...))")
        self.base = base
        self.rho = float(rho)
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if model else []
        self._perturbation: dict[torch.Tensor, torch.Tensor] = {}
        self._ready = False  # the gradients are the ones at the perturbed point (set by `restore`)
        super().__init__(base.param_groups, {})
        self.base.param_groups = self.param_groups  # one list of group dicts, whoever edits the rates

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def perturb(self) -> float:
        """w ← w + ε̂, ε̂ = ρ·g/‖g‖₂ from the current gradients (Eq. 2); returns ‖g‖₂. Parameters without a
        gradient are not moved; a zero gradient moves nothing."""
        if self._perturbation:
            raise TrainingError("SAM.perturb was called twice without restore(); call restore() after the "
                                "second backward pass")
        params = self._trainable()
        if not params:
            raise TrainingError("SAM found no gradient to perturb along; run loss.backward() before perturb() / "
                                "step(closure)")
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().double())
                                                     for p in params]))
        factor = self.rho / float(norm) if float(norm) > 0 else 0.0
        for param in params:
            step = param.grad.detach() * factor
            param.add_(step)
            self._perturbation[param] = step
        return float(norm)

    @torch.no_grad()
    def restore(self) -> None:
        """w ← w − ε̂: back to w, keeping the gradients computed at w + ε̂ for the next `step`."""
        for param, step in self._perturbation.items():
            param.sub_(step)
        self._perturbation.clear()
        self._ready = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step: with a closure, perturb, recompute the gradients at w + ε̂ (the closure's backward),
        restore and take the base step; without one, only the base step, after `perturb` / (backward) /
        `restore` were run by the caller (a transformers Trainer with `SharpnessAwareStep`)."""
        if closure is None:
            if not self._ready:
                raise TrainingError("SAM.step() needs a closure that recomputes the loss and gradients (see SAM's "
                                    "docstring), or perturb() / backward / restore() before it; deltatune's Trainer "
                                    "does this with TrainConfig(update_rule='sam')")
            loss = None
        else:
            self.perturb()
            self.zero_grad(set_to_none=True)
            with torch.enable_grad(), self.second_pass():
                loss = closure()
            self.restore()
        self._ready = False
        self.base.step()
        return loss

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[None]:
        """Within: the model's batch norms keep their running statistics (momentum 0; a cumulative-average norm,
        momentum None, keeps them too: its counter is restored)."""
        kept = [(norm, norm.momentum, None if norm.num_batches_tracked is None else norm.num_batches_tracked.clone(),
                 None if norm.running_mean is None else (norm.running_mean.clone(), norm.running_var.clone()))
                for norm in self._norms]
        for norm in self._norms:
            norm.momentum = 0.0
        try:
            yield
        finally:
            for norm, momentum, count, stats in kept:
                norm.momentum = momentum
                if count is not None:
                    norm.num_batches_tracked.copy_(count)
                if stats is not None:
                    norm.running_mean.copy_(stats[0])
                    norm.running_var.copy_(stats[1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (SAM keeps none between steps)."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self.base.param_groups = self.param_groups = self.base.param_groups

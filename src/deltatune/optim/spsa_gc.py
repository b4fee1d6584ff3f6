"""SPSA-GC — simultaneous perturbation stochastic approximation with gradient correction (BlackVIP; Oh, Hwang,
Kim, Park, Kim, Kim; CVPR 2023; official code changdaeoh/BlackVIP `trainers/blackvip.py`; our reading:
/work/shared/methods/other.md §8).

A zeroth-order update rule: it never asks for a gradient, only for the loss at chosen parameter values, so the
model that computes the loss can be a black box. At step k = 1, 2, ... (flat parameters w ∈ R^P):

    a_k = a / (k + o)^α                  step size (the "gain sequence")
    c_k = c / k^γ                        perturbation size
    Δ_i = ±u_i, u_i ~ U(0.5, 1), sign ±1 with probability 1/2 (the official "segmented uniform")
    ĝ   = mean over S draws of (L(w + c_k Δ) − L(w − c_k Δ)) / (2 c_k) · Δ^(−1)   (elementwise inverse)
    m   = ĝ at k = 1, else β m + ĝ;  g̃ = ĝ + β m        (the correction: a Nesterov-style look-ahead)
    w  ← w − a_k g̃                                      (plain SPSA: g̃ = ĝ)

Each draw costs two loss evaluations on the same batch, so one step costs 2·S queries of the model per example.
Defaults are the official ViT-B/16 config's: o 1.0, c 0.01, a 0.01, α 0.4, γ 0.1, β 0.9, S 5. The official
trainer's SGD optimizer and cosine schedule are built but never used (the step size is a_k alone); so here.

`SPSAGC` is a `torch.optim.Optimizer` whose `step(closure)` requires a closure that returns the loss at the
current parameter values (like LBFGS, but the closure must not call backward: it runs under no_grad here).
Its state (the step count, the correction's momentum and the perturbation generator) saves and loads with
`state_dict`, so a resumed run draws the same perturbations as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from deltatune.errors import TrainingError, config_check

Closure = Callable[[], Tensor | float]


def step_size(step: int, a: float = 0.01, offset: float = 1.0, alpha: float = 0.4) -> float:
    """a_k = a / (k + o)^α, the gain of step k (k >= 1)."""
    return a / (step + offset) ** alpha


def perturbation_size(step: int, c: float = 0.01, gamma: float = 0.1) -> float:
    """c_k = c / k^γ, the perturbation size of step k (k >= 1)."""
    return c / step**gamma


def segmented_uniform(size: int, generator: torch.Generator) -> Tensor:
    """Δ with Δ_i = ±u_i, u_i ~ U(0.5, 1) and a fair random sign: bounded away from 0, so Δ^(−1) stays bounded."""
    magnitude = (torch.rand(size, generator=generator, dtype=torch.float64) + 1.0) / 2.0
    sign = torch.randint(0, 2, (size,), generator=generator).to(torch.float64) * 2.0 - 1.0
    return magnitude * sign


def spsa_gradient(loss_at: Callable[[Tensor], float], w: Tensor, c_k: float, perturbations: int,
                  generator: torch.Generator) -> tuple[Tensor, list[float]]:
    """The two-sided SPSA estimate of ∇L(w), averaged over `perturbations` draws, and the 2·S losses it read.

    `loss_at(v)` returns the loss with the parameters set to the flat vector v."""
    estimate = torch.zeros_like(w)
    losses = []
    for _ in range(perturbations):
        delta = segmented_uniform(w.numel(), generator).to(device=w.device, dtype=w.dtype)
        plus, minus = loss_at(w + c_k * delta), loss_at(w - c_k * delta)
        estimate += (plus - minus) / (2.0 * c_k) / delta
        losses += [plus, minus]
    return estimate / perturbations, losses


class SPSAGC(torch.optim.Optimizer):
    """SPSA with gradient correction (see the module docstring); `correction=False` is plain SPSA."""

    def __init__(self, params: Iterable, a: float = 0.01, c: float = 0.01, offset: float = 1.0, alpha: float = 0.4,
                 gamma: float = 0.1, momentum: float = 0.9, perturbations: int = 5, correction: bool = True,
                 seed: int = 0) -> None:
        config_check(a > 0, "a", a, "a step-size scale > 0 (BlackVIP: 0.01)")
        config_check(c > 0, "c", c, "a perturbation scale > 0 (BlackVIP: 0.005 to 0.02)")
        config_check(offset >= 0, "offset", offset, "a stability offset o >= 0 (BlackVIP: 1.0)")
        config_check(alpha >= 0, "alpha", alpha, "a step-size decay exponent >= 0 (BlackVIP: 0.4)")
        config_check(gamma >= 0, "gamma", gamma, "a perturbation decay exponent >= 0 (BlackVIP: 0.1 or 0.2)")
        config_check(0 <= momentum < 1, "momentum", momentum, "a correction momentum β in [0, 1) (BlackVIP: 0.9)")
        config_check(isinstance(perturbations, int) and perturbations >= 1, "perturbations", perturbations,
                     "an integer S >= 1 (BlackVIP: 5)")
        defaults = dict(a=a, c=c, offset=offset, alpha=alpha, gamma=gamma, momentum=momentum,
                        perturbations=perturbations, correction=correction)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise TrainingError("SPSAGC perturbs one flat vector of parameters; pass one parameter group")
        self.generator = torch.Generator().manual_seed(seed)

    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def _state(self) -> dict:
        return self.state[self._params()[0]]

    def gains(self, step: int) -> tuple[float, float]:
        """(a_k, c_k) of step k under this optimizer's settings."""
        group = self.param_groups[0]
        return (step_size(step, group["a"], group["offset"], group["alpha"]),
                perturbation_size(step, group["c"], group["gamma"]))

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One SPSA-GC step; returns the mean of the 2·S losses it read. `closure()` returns the loss at the
        parameters' current values (it is called 2·S times per step, with the parameters perturbed)."""
        if closure is None:
            raise TrainingError("SPSAGC.step needs a closure that returns the loss at the current parameters: "
                                "optimizer.step(lambda: loss_fn(model(x), y))")
        group, state, params = self.param_groups[0], self._state(), self._params()
        k = int(state.get("step", 0)) + 1
        a_k, c_k = self.gains(k)
        w = parameters_to_vector(params).detach().clone()

        def loss_at(vector: Tensor) -> float:
            vector_to_parameters(vector, params)
            return float(closure())

        estimate, losses = spsa_gradient(loss_at, w, c_k, group["perturbations"], self.generator)
        direction = self._corrected(estimate, state, k, group) if group["correction"] else estimate
        if not torch.isfinite(direction).all():
            vector_to_parameters(w, params)
            raise TrainingError(f"SPSA-GC step {k}: the gradient estimate is not finite (losses {losses[:4]}...); "
                                "lower c or a, or check that the loss is finite")
        vector_to_parameters(w - a_k * direction, params)
        state["step"] = k
        return torch.tensor(sum(losses) / len(losses))

    @staticmethod
    def _corrected(estimate: Tensor, state: dict, k: int, group: dict) -> Tensor:
        """m = ĝ (first step) or β m + ĝ; the look-ahead direction ĝ + β m."""
        beta = group["momentum"]
        momentum = estimate.clone() if k == 1 or "momentum" not in state else beta * state["momentum"] + estimate
        state["momentum"] = momentum
        return estimate + beta * momentum

    def state_dict(self) -> dict:
        saved = super().state_dict()
        saved["generator"] = self.generator.get_state()
        return saved

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        if generator is not None:
            self.generator.set_state(generator.cpu())

"""AdamR — Adam with delta regularization toward the pre-trained weights (DAREx-L2; Deng et al., "DARE the
Extreme", ICLR 2025, §5; official code vengdeng/DAREx `AdamR.py`).

DARE-style pruning fails when the fine-tuning delta θ − θ_0 has a large mean or variance. AdamR keeps the
delta small during fine-tuning: every step, before the Adam update, it decays each parameter toward its
pre-trained value θ_0 with a decoupled, "stable" (AdamS-style) step

    θ ← θ − (λ · lr / sqrt(mean(v̂))) · (θ − θ_0)            (L2; `l1=True` uses sign(θ − θ_0))

where mean(v̂) is the mean bias-corrected second moment over **all** parameters being optimised (a scalar),
then applies the usual Adam step θ ← θ − lr · m̂ / (sqrt(v̂) + eps). Prune the result with DARE or DAREx-q
(`deltatune prune`) — that pipeline is DAREx-L2.

Defaults are the official class's: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay λ = 1e-4. The
regularization strengths used in the paper's tables were not available to us; tune λ on validation data.
θ_0 is a copy of the parameters taken when the optimizer is built, unless `reference` gives it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from deltatune.errors import TrainingError, config_check


class AdamR(torch.optim.Optimizer):
    """Adam with stable decay of θ − θ_0 (see the module docstring). Usable wherever torch.optim.Adam is."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-4, l1: bool = False,
                 reference: Mapping[Tensor, Tensor] | None = None) -> None:
        config_check(lr >= 0, "lr", lr, "a learning rate >= 0")
        config_check(eps >= 0, "eps", eps, "eps >= 0")
        config_check(0 <= betas[0] < 1 and 0 <= betas[1] < 1, "betas", betas, "two values in [0, 1)")
        config_check(weight_decay >= 0, "weight_decay", weight_decay, "a decay strength >= 0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, l1=l1))
        for group in self.param_groups:
            for param in group["params"]:
                start = reference[param] if reference is not None and param in reference else param
                self.state[param]["reference"] = start.detach().clone()

    @staticmethod
    def factory(**options) -> Callable[..., AdamR]:
        """An `optimizer_factory` for trainers: `factory(weight_decay=1e-3)(model_or_params, lr=...)`."""

        def build(model_or_params, lr: float | None = None, **overrides) -> AdamR:
            params = model_or_params
            if isinstance(model_or_params, nn.Module):
                params = [p for p in model_or_params.parameters() if p.requires_grad]
            settings = {**options, **overrides, **({"lr": lr} if lr is not None else {})}
            return AdamR(params, **settings)

        return build

    def _update_moments(self) -> float:
        """Advance m and v for every parameter with a gradient; return sqrt(mean v̂) over all of them (1 if 0)."""
        total, count = 0.0, 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise TrainingError("AdamR does not support sparse gradients; use dense gradients")
                state = self.state[param]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(param.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                total += float(state["exp_avg_sq"].sum()) / (1 - beta2 ** state["step"])
                count += param.numel()
        root_mean = math.sqrt(total / count) if count else 0.0
        return root_mean if root_mean > 0 else 1.0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        root_mean = self._update_moments()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if group["weight_decay"] != 0:
                    drift = param - state["reference"].to(param.device)
                    decay = drift.sign() if group["l1"] else drift
                    param.add_(decay, alpha=-group["weight_decay"] * group["lr"] / root_mean)
                corrected_sq = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                denominator = corrected_sq.sqrt_().add_(group["eps"])
                param.addcdiv_(state["exp_avg"], denominator, value=-group["lr"] / (1 - beta1 ** state["step"]))
        return loss

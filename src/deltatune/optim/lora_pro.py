"""LoRA-Pro — LoRA's factor gradients adjusted so that the low-rank step best matches full fine-tuning (Wang,
Liang, He, Wang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025, arXiv:2407.18242;
official code mrflogs/LoRA-Pro, `lorapro_full_adjustment` and `solve_sylvester` in the patched
DeepSpeed-0.15.1/deepspeed/runtime/zero/stage_1_and_2.py).

With W = W0 + s·B·A, the raw gradients are g_A = s·Bᵀ·G and g_B = s·G·Aᵀ (G = ∂L/∂W). Steps A −= η·H_A,
B −= η·H_B move W, to first order, by −η·s·(B·H_A + H_B·A): the "equivalent gradient" (paper §2.1). LoRA-Pro
picks (H_A, H_B) minimising ‖s(B·H_A + H_B·A) − G‖_F, which G enters only through g_A and g_B. All minimisers
(the paper's Theorem 2.1, for full-rank A and B):

    H_A = (1/s²)·(BᵀB)⁻¹·g_A + X·A
    H_B = (1/s²)·(I − B(BᵀB)⁻¹Bᵀ)·g_B·(AAᵀ)⁻¹ − B·X,          any X ∈ R^{r×r}

and then s(B·H_A + H_B·A) = P_B·G + (I − P_B)·G·P_A, the projection of G (X cancels). Among them, the one
closest to the raw gradients (min ‖H_A − g_A‖² + ‖H_B − g_B‖², Theorem 2.3) has the X that solves the
Sylvester equation

    (BᵀB)·X + X·(AAᵀ) = −(1/s²)·(BᵀB)⁻¹·g_A·Aᵀ

solved here exactly by diagonalising both symmetric Gram matrices (`solve_sylvester`; the official code uses
a general complex eigendecomposition of the same equation). Inverses are pinv(M + 1e-8·I), as in the code.

The Adam version (the paper's Algorithm with AdamW, what the official code runs, `moments="full"`): per pair
and step, (1) the equivalent gradient G̃ = s(B·H_A + H_B·A) with X = 0 from the raw gradients; (2) full-size
Adam moments on G̃ (two out × in matrices per adapted layer, as full fine-tuning holds), U = m̂/(√v̂ + ε);
(3) U taken as the full gradient: g'_A = s·Bᵀ·U, g'_B = s·U·Aᵀ, adjusted with the optimal X; (4) A −= η·H_A,
B −= η·H_B. While B = 0 (LoRA's first step) the formulas reduce to the code's first-step branch
(H_A = g_A = 0, H_B = (1/s²)·g_B·(AAᵀ)⁻¹).

Sources: the formulas are the official code's, re-derived and checked numerically in our notes
(shared/methods/lowrank.md §9) and against float64 brute-force least squares in tests/optim/test_lora_pro.py.
The theorem numbers (2.1 closed form, 2.3 optimal X) are those of arXiv 2407.18242 §2 as we cite them from
memory: the stored copies of the paper showed us only its abstract, so check them against the paper.

Deviations from the official code, on purpose: s is each delta's real scale (`HasLowRankPair`; the code
hard-codes s = 16/8 whatever the LoRA config, rsLoRA included); pairs come from the capability, not from the
parameter order; parameters that are not factors (heads, biases, DoRA's magnitude) get plain AdamW with the
same rate, betas and ε. Decoupled weight decay on the factors (default 0; the official runs use 0).

`moments="low_rank"` is a MEMORY-LIGHT VARIANT, NOT THE PAPER'S: the adjusted raw gradients (H_A, H_B) of
Theorems 2.1/2.3 are fed to ordinary Adam moments of the factors' own shapes (r × in and out × r), so the
optimizer state is LoRA's. It keeps the adjusted direction but not the full-size second moments; the
LoRA-Pro authors' blog suggests it; no paper number describes it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import TrainingError, config_check
from deltatune.optim.pairs import other_parameters, require_factor_pairs

MOMENTS = ("full", "low_rank")
RIDGE = 1e-8  # added to the Gram matrices before the pseudo-inverse, as the official code does


# --- the closed form (pure functions on the (r, in) / (out, r) matrix views) ---------------------------------------
def solve_sylvester(left: Tensor, right: Tensor, rhs: Tensor) -> Tensor:
    """X with left·X + X·right = rhs, for symmetric positive semi-definite `left` and `right` (r × r Gram
    matrices). With left = U·Λ·Uᵀ and right = V·M·Vᵀ, Y = Uᵀ·X·V solves Y_ij·(λ_i + μ_j) = (Uᵀ·rhs·V)_ij; pairs
    with λ_i + μ_j ≈ 0 (both Grams singular there) get Y_ij = 0, the least-norm solution. Computed in float64."""
    left64, right64, rhs64 = left.double(), right.double(), rhs.double()
    values_left, vectors_left = torch.linalg.eigh((left64 + left64.T) / 2)
    values_right, vectors_right = torch.linalg.eigh((right64 + right64.T) / 2)
    sums = values_left[:, None] + values_right[None, :]
    floor = torch.finfo(torch.float64).eps * max(float(sums.abs().max()), 1.0) * sums.shape[0]
    rotated = vectors_left.T @ rhs64 @ vectors_right
    solved = torch.where(sums.abs() > floor, rotated / torch.where(sums.abs() > floor, sums, 1.0), 0.0)
    return (vectors_left @ solved @ vectors_right.T).to(rhs.dtype)


def _ridge_inverse(gram: Tensor, ridge: float) -> Tensor:
    """pinv(gram + ridge·I) in float64."""
    gram64 = gram.double()
    return torch.linalg.pinv(gram64 + ridge * torch.eye(gram64.shape[0], dtype=gram64.dtype, device=gram64.device))


def adjusted_gradients(down: Tensor, up: Tensor, grad_down: Tensor, grad_up: Tensor, scale: float, *,
                       optimal_x: bool = True, ridge: float = RIDGE) -> tuple[Tensor, Tensor]:
    """(H_A, H_B) of Theorem 2.1 for factors A = `down` (r, in), B = `up` (out, r) and their gradients with
    respect to a full gradient G (g_A = s·Bᵀ·G, g_B = s·G·Aᵀ): X from the Sylvester equation of Theorem 2.3
    when `optimal_x`, else X = 0 (the same equivalent gradient, not the closest to the raw gradients)."""
    dtype = grad_down.dtype
    a, b, g_a, g_b = down.double(), up.double(), grad_down.double(), grad_up.double()
    inverse_btb, inverse_aat = _ridge_inverse(b.T @ b, ridge), _ridge_inverse(a @ a.T, ridge)
    first = inverse_btb @ g_a / scale ** 2
    right = g_b @ inverse_aat
    second = (right - b @ (inverse_btb @ (b.T @ right))) / scale ** 2  # (I − B(BᵀB)⁻¹Bᵀ)·g_B·(AAᵀ)⁻¹ / s²
    if optimal_x:
        x = solve_sylvester(b.T @ b, a @ a.T, -(inverse_btb @ g_a @ a.T) / scale ** 2)
        first, second = first + x @ a, second - b @ x
    return first.to(dtype), second.to(dtype)


def equivalent_gradient(down: Tensor, up: Tensor, grad_down: Tensor, grad_up: Tensor, scale: float) -> Tensor:
    """s·(B·H_A + H_B·A): the full-weight gradient a step along (H_A, H_B) amounts to (paper §2.1)."""
    return scale * (up @ grad_down + grad_up @ down)


# --- the optimizer ---------------------------------------------------------------------------------------------
def _adam_direction(state: dict, grad: Tensor, betas: tuple[float, float], eps: float) -> Tensor:
    """Advance Adam's moments (kept in `state`) by `grad` and return m̂ / (√v̂ + ε)."""
    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    state["step"] += 1
    beta1, beta2 = betas
    state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    corrected = state["exp_avg"] / (1 - beta1 ** state["step"])
    return corrected / ((state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(eps))


class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro over every (A, B) pair of `model` (see the module docstring); other trainable parameters get
    AdamW. Build it from the model, then use it as any torch optimizer (a plain loop, deltatune's Trainer via
    `TrainConfig(update_rule="lora_pro")`, or a transformers Trainer with `optimizers=(optimizer, None)`).

    Args:
        model: an adapted model with trainable `HasLowRankPair` deltas (lora, pissa, olora, dora).
        lr: the step size η (the official runs: 2e-5 on Llama-2-7B with an SGD outer loop, the same thing).
        betas, eps: Adam's (0.9, 0.999) and 1e-8, the official code's values.
        weight_decay: decoupled decay of every parameter (factors included), 0 by default.
        moments: "full" (the paper: out × in moments of the equivalent gradient per pair) or "low_rank"
            (a memory-light variant, not the paper's: Adam moments of the adjusted factor gradients).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, moments: str = "full") -> None:
        config_check(isinstance(lr, (int, float)) and lr > 0, "lr", lr, "a learning rate > 0")
        config_check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "betas", betas, "two values in [0, 1)")
        config_check(eps >= 0, "eps", eps, "a number >= 0")
        config_check(weight_decay >= 0, "weight_decay", weight_decay, "a number >= 0")
        config_check(moments in MOMENTS, "moments", moments, f"one of {MOMENTS} ('full' is the paper's)")
        pairs = require_factor_pairs(model, "LoRA-Pro")
        names = {id(p): n for n, p in model.named_parameters()}
        factors = [p for pair in pairs for p in (pair.down, pair.up)]
        groups = [{"params": factors, "param_names": [names[id(p)] for p in factors], "role": "pairs",
                   "scales": [pair.scale for pair in pairs]}]
        others = [p for _, p in other_parameters(model, pairs)]
        if others:
            groups.append({"params": others, "param_names": [names[id(p)] for p in others], "role": "other"})
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      moments=moments))

    @staticmethod
    def factory(**options: Any) -> Callable[..., LoRAPro]:
        """`factory(moments="low_rank")(model, lr=...)`: a builder with fixed options."""
        return lambda model, lr=None, **more: LoRAPro(model, **options, **more, **({} if lr is None else {"lr": lr}))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["role"] == "pairs":
                params = group["params"]
                for index, scale in enumerate(group["scales"]):
                    self._step_pair(params[2 * index], params[2 * index + 1], scale, group)
            else:
                self._step_others(group)
        return loss

    def _step_others(self, group: dict) -> None:
        for param in group["params"]:
            if param.grad is None:
                continue
            _check_dense(param.grad)
            direction = _adam_direction(self.state[param], param.grad, group["betas"], group["eps"])
            _apply(param, direction, group)

    def _step_pair(self, down: nn.Parameter, up: nn.Parameter, scale: float, group: dict) -> None:
        if down.grad is None and up.grad is None:
            return
        rank = down.shape[0]
        a, b = down.detach().reshape(rank, -1), up.detach().reshape(up.shape[0], rank)
        g_a = _matrix_grad(down, a)
        g_b = _matrix_grad(up, b)
        if group["moments"] == "full":
            h_a, h_b = self._full_moment_directions(down, a, b, g_a, g_b, scale, group)
        else:
            h_a, h_b = adjusted_gradients(a, b, g_a, g_b, scale)
            h_a = _adam_direction(self.state[down], h_a, group["betas"], group["eps"])
            h_b = _adam_direction(self.state[up], h_b, group["betas"], group["eps"])
        _apply(down, h_a.reshape(down.shape), group)
        _apply(up, h_b.reshape(up.shape), group)

    def _full_moment_directions(self, down: nn.Parameter, a: Tensor, b: Tensor, g_a: Tensor, g_b: Tensor,
                                scale: float, group: dict) -> tuple[Tensor, Tensor]:
        """Steps (1)–(3) of the Adam version: Adam on the equivalent gradient (moments out × in, kept in A's
        state), then the Adam direction U projected back onto the factors with the optimal X."""
        first, second = adjusted_gradients(a, b, g_a, g_b, scale, optimal_x=False)
        equivalent = equivalent_gradient(a, b, first, second, scale)
        update = _adam_direction(self.state[down], equivalent, group["betas"], group["eps"])
        return adjusted_gradients(a, b, scale * b.T @ update, scale * update @ a.T, scale)


def _matrix_grad(param: nn.Parameter, view: Tensor) -> Tensor:
    if param.grad is None:
        return torch.zeros_like(view)
    _check_dense(param.grad)
    return param.grad.reshape(view.shape)


def _check_dense(grad: Tensor) -> None:
    if grad.is_sparse:
        raise TrainingError("LoRA-Pro does not support sparse gradients; use dense gradients")


def _apply(param: nn.Parameter, direction: Tensor, group: dict) -> None:
    """param ← param − lr·wd·param − lr·direction (decoupled weight decay, as AdamW)."""
    if group["weight_decay"]:
        param.mul_(1 - group["lr"] * group["weight_decay"])
    param.add_(direction.to(param.dtype), alpha=-group["lr"])

"""Weight-decomposed (DoRA) products: row norms of W + s·BA, and the fused magnitude-scaled low-rank linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


@torch.no_grad()
def lowrank_row_norms(weight_matrix: Tensor, down: Tensor, up: Tensor, scale: float | Tensor) -> Tensor:
    """‖W + scale · up @ down‖ per row (L2 over the fan-in), without gradient: DoRA's detached norm.

    `weight_matrix` is the (out, fan_in) matrix view; `down` (r, ...) and `up` (out, r, ...) in any native layout.
    One addmm forms W + s·BA (the only full-size temporary), then one reduction."""
    combined = torch.addmm(weight_matrix, up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1),
                           alpha=float(scale))
    return torch.linalg.vector_norm(combined, dim=1)


def magnitude_lowrank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor,
                             scale: float, magnitude: Tensor, norm: Tensor) -> Tensor:
    """y = (magnitude / norm) ⊙ (x Wᵀ + scale · (x downᵀ) upᵀ) + b as one autograd node (DoRA on a linear layer).

    `norm` is treated as a constant (DoRA §4.3: no gradient through ‖W + sBA‖). Compared with the composition
    of autograd ops, the branch is added by the second GEMM itself, the per-row gain g = m/n is applied once on
    the way out, and backward never forms g ⊙ grad: the gain is folded into the (out, in) weight and the
    (out, r) factor instead of the (tokens, out) gradient. The pre-gain output u is kept for the magnitude's
    gradient Σ_tokens grad ⊙ u / n. Differentiable once.
    """
    return _MagnitudeLowRankLinear.apply(x, weight, bias, down, up, scale, magnitude, norm)[0]


class _MagnitudeLowRankLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float,
                magnitude: Tensor, norm: Tensor):
        rows = x.reshape(-1, x.shape[-1])
        direction = F.linear(rows, weight)
        hidden = F.linear(rows, down)  # (tokens, r), kept for up's gradient
        direction.addmm_(hidden, up.t(), alpha=scale)
        gain = magnitude / norm
        out = direction * gain if bias is None else torch.addcmul(bias, direction, gain)
        return out.view(*x.shape[:-1], out.shape[-1]), hidden, direction

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, weight, _, down, up, scale, magnitude, norm = inputs
        _, hidden, direction = output
        ctx.mark_non_differentiable(hidden, direction)
        need_x, need_weight, _, need_down, need_up, _, need_magnitude, _ = ctx.needs_input_grad
        rows = x.reshape(-1, x.shape[-1]) if (need_weight or need_down) else None
        ctx.save_for_backward(rows, hidden if need_up else None, direction if need_magnitude else None,
                              weight, down, up, magnitude, norm)
        ctx.scale, ctx.input_shape = scale, x.shape

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_hidden: Tensor | None, _grad_direction: Tensor | None):
        rows, hidden, direction, weight, down, up, magnitude, norm = ctx.saved_tensors
        need_x, need_weight, need_bias, need_down, need_up, _, need_magnitude, _ = ctx.needs_input_grad
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        gain = magnitude / norm
        grad_x = grad_weight = grad_bias = grad_down = grad_up = grad_magnitude = None
        if need_x or need_down:
            # g ⊙ grad never formed: (g ⊙ grad) @ up = grad @ (g ⊙ up), likewise for the weight
            grad_hidden = grad @ (up * (gain[:, None] * ctx.scale))  # (tokens, r)
            if need_down:
                grad_down = grad_hidden.t() @ rows
            if need_x:
                grad_x = (grad @ (weight * gain[:, None])).addmm_(grad_hidden, down).view(ctx.input_shape)
        if need_up:
            grad_up = (hidden.t() @ grad).t().mul_(gain[:, None] * ctx.scale).contiguous()
        if need_weight:
            grad_weight = (grad.t() @ rows).mul_(gain[:, None])
        if need_bias:
            grad_bias = grad.sum(0)
        if need_magnitude:
            grad_magnitude = torch.linalg.vecdot(grad.t(), direction.t()) / norm
        return grad_x, grad_weight, grad_bias, grad_down, grad_up, None, grad_magnitude, None

"""Low-rank products in every layer kind's native weight layout (see `core.layers`), and the fused low-rank linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatune.core.layers import LayerInfo


def lowrank_delta_weight(layer: LayerInfo, down: Tensor, up: Tensor, scale: float | Tensor) -> Tensor:
    """ΔW = scale · up @ down in the base weight's native shape.

    `down` is (r, fan_in) or, for convolutions, (r, in/groups, *kernel); `up` is (out, r) or (out, r, 1, ...).
    """
    matrix = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return layer.from_matrix(matrix * scale)


def lowrank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float) -> Tensor:
    """y = x Wᵀ + b + scale · (x downᵀ) upᵀ — a frozen or trainable linear layer plus a low-rank branch, as one
    autograd node.

    Same math as `F.linear(x, W, b) + scale * F.linear(F.linear(x, down), up)`, with less work: the branch is
    added by the second GEMM itself (`addmm`, scale as its alpha, so no separate multiply and add over the
    output), backward computes the input gradient of base and branch into one buffer (`g W + (scale · g up)
    down`) instead of two that autograd then sums, and the rank-r products use the BLAS-friendly layouts.
    `weight` is the (out, in) matrix (a transposed view is fine); gradients are computed only for the inputs that
    require them. Works under torch.func transforms and torch.compile; differentiable once (double backward
    raises an error: use the unfused composition for higher-order gradients).
    """
    return _LowRankLinear.apply(x, weight, bias, down, up, scale)[0]


class _LowRankLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor, scale: float):
        rows = x.reshape(-1, x.shape[-1])
        out = F.linear(rows, weight, bias)
        hidden = F.linear(rows, down)  # (tokens, r), kept for up's gradient
        out.addmm_(hidden, up.t(), alpha=scale)
        return out.view(*x.shape[:-1], out.shape[-1]), hidden

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, weight, _, down, up, scale = inputs
        hidden = output[1]
        ctx.mark_non_differentiable(hidden)
        _, need_weight, _, need_down, need_up = ctx.needs_input_grad[:5]
        rows = x.reshape(-1, x.shape[-1]) if (need_weight or need_down) else None
        # keep only what backward reads: the input for weight/down gradients, the rank-r hidden for up's
        ctx.save_for_backward(rows, hidden if need_up else None, weight, down, up)
        ctx.scale, ctx.input_shape = scale, x.shape

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_hidden: Tensor | None):
        rows, hidden, weight, down, up = ctx.saved_tensors
        need_x, need_weight, need_bias, need_down, need_up = ctx.needs_input_grad[:5]
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = grad_down = grad_up = None
        # The two products with a long (tokens) side and a rank-r side are laid out so that the r-wide operand is
        # the transposed one: BLAS runs `grad @ up` and `gradᵀ @ hidden` 2-5x slower on the row-major layouts
        # autograd would use (measured with MKL on CPU); the results are the same numbers.
        if need_x or need_down:
            grad_hidden = (grad @ up.t().contiguous().t()).mul_(ctx.scale)  # (tokens, r): gradient before `down`
            if need_down:
                grad_down = grad_hidden.t() @ rows
            if need_x:
                grad_x = (grad @ weight).addmm_(grad_hidden, down).view(ctx.input_shape)
        if need_up:
            grad_up = (hidden.t() @ grad).mul_(ctx.scale).t().contiguous()
        if need_weight:
            grad_weight = grad.t() @ rows
        if need_bias:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, grad_down, grad_up, None

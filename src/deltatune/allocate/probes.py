"""∂L/∂ΔW for deltas that never form ΔW in forward.

A delta's output is `op(x, ΔW)` (no bias) for its layer's op, so ∂L/∂ΔW follows from the delta's input x and
the gradient g of its output: for a Linear it is gᵀx summed over tokens, for a convolution the weight-gradient
of the convolution, for an embedding the scatter-add of g. The probe records (x, g) pairs during every backward
pass (so gradient accumulation sums them, giving the gradient of the whole optimizer step) and turns them into
the (out, fan_in) matrix on demand, with autograd on the layer's own op: every layer kind works the same way.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, nn

from deltatune.allocate.protocols import HasActivationObserver


class DeltaGradientProbe:
    """Attach to deltas with `set_activation_observer`; `delta_gradient(delta)` pops what was recorded."""

    def __init__(self, deltas: dict[str, nn.Module]) -> None:
        self.deltas = {path: d for path, d in deltas.items() if isinstance(d, HasActivationObserver)}
        self._pairs: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)
        for delta in self.deltas.values():
            delta.set_activation_observer(self._observe)

    def _observe(self, delta: nn.Module, x: Tensor, out: Tensor) -> None:
        if not out.requires_grad:  # evaluation passes and no_grad blocks record nothing
            return
        x = x.detach()
        pairs = self._pairs[id(delta)]
        out.register_hook(lambda grad: pairs.append((x, grad.detach())))

    def has_gradient(self, delta: nn.Module) -> bool:
        return bool(self._pairs.get(id(delta)))

    def delta_gradient(self, delta: nn.Module) -> Tensor | None:
        """∂L/∂ΔW as an (out, fan_in) matrix from the pairs recorded since the last call, or None."""
        pairs = self._pairs.pop(id(delta), [])
        if not pairs:
            return None
        layer = delta.layer
        reference = delta.lora_A
        with torch.enable_grad():
            weight = torch.zeros(layer.weight_shape, dtype=reference.dtype, device=reference.device,
                                 requires_grad=True)
            total = torch.zeros_like(weight)
            for x, grad in pairs:
                (part,) = torch.autograd.grad(layer.op(x, weight, None), weight, grad)
                total = total + part
        return layer.to_matrix(total)

    def clear(self) -> None:
        self._pairs.clear()

    def close(self) -> None:
        """Detach from the deltas and drop what was recorded."""
        for delta in self.deltas.values():
            delta.set_activation_observer(None)
        self.clear()

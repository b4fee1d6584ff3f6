"""Low-rank products in every layer kind's native weight layout (see `core.layers`)."""
from __future__ import annotations

from torch import Tensor

from deltatune.core.layers import LayerInfo


def lowrank_delta_weight(layer: LayerInfo, down: Tensor, up: Tensor, scale: float | Tensor) -> Tensor:
    """ΔW = scale · up @ down in the base weight's native shape.

    `down` is (r, fan_in) or, for convolutions, (r, in/groups, *kernel); `up` is (out, r) or (out, r, 1, ...).
    """
    matrix = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return layer.from_matrix(matrix * scale)

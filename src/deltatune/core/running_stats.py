"""Running statistics of normalization layers (BatchNorm's ``running_mean``, ``running_var``,
``num_batches_tracked``).

They are buffers, not parameters: a forward pass in train mode changes them although no optimizer trains them,
so an adapter without them does not reproduce the trained model's eval outputs. Every module with
``track_running_stats=True`` (the BatchNorm family, InstanceNorm when asked to track) contributes its persistent
buffers under their model keys (``layer1.0.bn1.running_mean``). They are model state, not per-adapter state:
loading an adapter sets them, deleting it does not restore the earlier values.
"""
from __future__ import annotations

from torch import Tensor, nn


def running_statistics(model: nn.Module) -> dict[str, Tensor]:
    """Model key -> buffer for every persistent buffer of a module that tracks running statistics."""
    state: dict[str, Tensor] = {}
    for path, module in model.named_modules():
        if getattr(module, "track_running_stats", False) is not True:
            continue
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[f"{path}.{name}" if path else name] = buffer
    return state

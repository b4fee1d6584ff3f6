"""What `adapt` would build, computed without touching the model.

File formats that name tensors differently (peft) need the keys an adapter *would* have before it exists. Instead
of adapting a throw-away adapter on the user's model, they ask here: the layers `config` targets (found exactly as
`adapt` finds them) and, per layer, the method's delta built on the meta device, which has the real tensor names
and shapes but no storage, draws no random numbers and is never attached to anything.
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta
from deltatune.core.host import AdaptedLayer
from deltatune.core.layers import LayerInfo, describe_layer
from deltatune.core.model import extra_modules
from deltatune.core.registry import entry_for_config
from deltatune.core.targets import find_targets


def planned_layers(model: nn.Module, config: DeltaConfig) -> list[tuple[str, LayerInfo]]:
    """(module path, base layer description) of every layer `adapt(model, config)` would wrap."""
    entry = entry_for_config(config)
    layers = []
    for path in find_targets(model, config, entry.delta_cls.layer_kinds, entry.name):
        module = model.get_submodule(path)
        layers.append((path, describe_layer(module.base_layer if isinstance(module, AdaptedLayer) else module)))
    return layers


def delta_blueprint(config: DeltaConfig, path: str, layer: LayerInfo) -> Delta:
    """The delta `config`'s method builds for `layer` at `path`, on the meta device (names and shapes only)."""
    with torch.device("meta"):
        return entry_for_config(config).delta_cls(config, layer, path)


def planned_state_keys(model: nn.Module, config: DeltaConfig) -> set[str]:
    """The keys `adapter_state_dict` would give once `config` is adapted onto `model`."""
    keys = {f"{path}.{key}" for path, layer in planned_layers(model, config)
            for key in delta_blueprint(config, path, layer).state_dict()}
    for path, module in extra_modules(model, config):
        keys |= {f"{path}.{key}" if path else key for key in module.state_dict()}
    return keys

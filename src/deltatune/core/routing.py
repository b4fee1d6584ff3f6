"""Mixed-adapter batches: each sample of one forward through its own adapter (or the base model).

    with deltatune.route(model, ["fr", "de", "base", "fr"]):
        out = model(batch)          # row 0 and 3 through adapter "fr", row 1 through "de", row 2 through none

Inside the block every host runs the base layer on the whole batch and each adapter's delta on its own rows
(`core.host.AdaptedLayer._forward_routed`), so the result equals running each sub-batch alone with that adapter
active, for every delta whose `routes_per_sample` is True (additive and output-side deltas). The active set is
set aside meanwhile: a row sees exactly the adapter it is routed to. Gradients flow the same way, so one backward
trains several adapters at once, each from its own rows (`deltatune.train.multi_adapter`).

The rows are the batch dimension (dim 0) of every adapted layer's input. Weight-space and input-side deltas are
refused by name, as are merged adapters (their change is in the shared weights).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from deltatune.core.delta import DeltaKind
from deltatune.core.host import AdaptedLayer, RoutedGroups
from deltatune.core.model import adapter_state, iter_deltas, iter_hosts
from deltatune.core.registry import entry_for_config
from deltatune.errors import RoutingError

BASE = "base"  # the name that routes a sample through no adapter


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Run sample i of every forward inside this block through adapter `adapter_names[i]` ("base": none).

    Every name must be an adapter of `model` (or "base") whose method can route per sample (additive and
    output-side deltas); the batch of each adapted layer must have len(adapter_names) rows. Works in training
    too: each adapter's gradients come from its own rows only."""
    names = list(adapter_names)
    groups = _row_groups(model, names)
    hosts = [host for _, host in iter_hosts(model)]
    if any(host.merged for host in hosts):
        raise RoutingError("adapters are merged into the weights, which every sample shares; call "
                           "deltatune.unmerge(model) before routing samples to adapters")
    for host in hosts:
        host.routes = _host_groups(host, groups, len(names))
    try:
        yield model
    finally:
        for host in hosts:
            host.routes = None


def _row_groups(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """adapter name -> the indices of its rows, on the model's device (no entry for "base")."""
    if not names:
        raise RoutingError("adapter_names is empty: pass one adapter name (or 'base') per sample of the batch")
    configs = adapter_state(model).configs
    unknown = [n for n in dict.fromkeys(names) if n != BASE and n not in configs]
    if unknown:
        known = ", ".join(configs) or "none"
        raise RoutingError(f"no adapter named {unknown[0]!r} on this model (adapters: {known}; 'base' runs none)")
    device = _model_device(model)
    rows: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        if name != BASE:
            rows.setdefault(name, []).append(index)
    for name in rows:
        _check_routable(model, name)
    return {name: torch.tensor(indices, dtype=torch.long, device=device) for name, indices in rows.items()}


def _check_routable(model: nn.Module, name: str) -> None:
    for path, _, delta in iter_deltas(model, name):
        if not delta.routes_per_sample:
            method = entry_for_config(adapter_state(model).configs[name]).name
            raise RoutingError(
                f"adapter {name!r} ({method}) cannot be routed per sample: its {delta.kind.value}-side delta on "
                f"{path!r} changes what every row of the batch shares; run its samples in their own batch with "
                "deltatune.set_active"
            )


def _host_groups(host: AdaptedLayer, groups: dict[str, Tensor], batch_size: int) -> RoutedGroups:
    additive = tuple((host.deltas[n], rows) for n, rows in groups.items()
                     if n in host.deltas and host.deltas[n].kind is DeltaKind.ADDITIVE)
    output = tuple((host.deltas[n], rows) for n, rows in groups.items()
                   if n in host.deltas and host.deltas[n].kind is DeltaKind.OUTPUT)
    return RoutedGroups(
        batch_size, additive, output,
        torch.cat([rows for _, rows in additive]) if additive else None,
        torch.cat([rows for _, rows in output]) if output else None,
    )


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise RoutingError("the model has no parameters to take a device from; route a model with weights")
    return parameter.device

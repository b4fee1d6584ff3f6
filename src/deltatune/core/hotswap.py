"""Hot-swapping: replace a loaded adapter's tensors by another saved adapter's, in place, so that a
`torch.compile`d model keeps its graphs (no recompilation) and serves the new adapter at once.

    deltatune.load_adapter(model, "adapters/first", "served")
    deltatune.prepare_hotswap(model, "served", max_rank=16)   # once, before torch.compile
    compiled = torch.compile(model)
    deltatune.hotswap_adapter(model, "adapters/second", "served")   # rank ≤ 16, any alpha: values change only

Deltas with the `SwapsRank` capability (LoRA) are zero-padded to `max_rank` once and keep their scale as a tensor;
a swap then writes the new factors into the padded ones and the new scale into that tensor. Their
`hot_swappable_fields` (LoRA: rank, alpha, rslora) may differ; every other config field must be equal. Every other
method swaps when the new config equals the loaded one, its tensors having fixed shapes (SSF, BitFit, bottleneck
and parallel adapters, LoHa/LoKr, FLoRA, SaRA ... at the same hyper-parameters). The new adapter must adapt the
same modules (targeting fields may be spelled differently): any other set is refused by name, as is a rank above
the prepared maximum. The check is done for every module before any tensor is written.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.core.attach import adapter_state_dict
from deltatune.core.capabilities import SwapsRank
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta
from deltatune.core.deltatune_format import CONFIG_FILE, read_deltatune_folder
from deltatune.core.formats import adapter_folder
from deltatune.core.model import _config_of, adapter_state, iter_deltas
from deltatune.core.registry import entry_for_config
from deltatune.core.running_stats import running_statistics
from deltatune.errors import HotSwapError

# Fields that choose modules: the swapped adapter must cover the same modules, however it spelled them.
_TARGETING = frozenset({"targets", "layer_types", "exclude", "untie"})


def prepare_hotswap(model: nn.Module, name: str = "default", max_rank: int | None = None) -> nn.Module:
    """Make adapter `name` swappable in place: deltas with `SwapsRank` are zero-padded to `max_rank` (default:
    their rank now) and read their scale from a tensor. Call once, before `torch.compile` and before building
    an optimizer (the padded factors are new parameters). The outputs do not change."""
    _config_of(model, name)
    deltas = [delta for _, _, delta in iter_deltas(model, name)]
    if max_rank is not None and not all(isinstance(delta, SwapsRank) for delta in deltas):
        method = entry_for_config(_config_of(model, name)).name
        raise HotSwapError(f"adapter {name!r} ({method}) has no rank to pad: its tensors have fixed shapes and it "
                           "swaps as it is when the new adapter's config is equal; call prepare_hotswap without "
                           "max_rank")
    for delta in deltas:
        if isinstance(delta, SwapsRank):
            delta.pad_to_rank(max_rank if max_rank is not None else delta.rank)
    if deltas and isinstance(deltas[0], SwapsRank):
        adapter_state(model).configs[name] = deltas[0].config
    return model


def hotswap_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                    allow_nonfinite: bool = False) -> nn.Module:
    """Replace the tensors of loaded adapter `name` in place by those of the deltatune adapter folder `path`
    (same method and modules; a rank up to the prepared maximum and any alpha for `SwapsRank` deltas). All or
    nothing: a refused swap leaves the model as it was. Returns the same model."""
    folder = adapter_folder(path)
    config, tensors = _read_folder(folder, allow_nonfinite)
    current = _config_of(model, name)
    _check_method(current, config, folder)
    swaps = _planned_swaps(model, name, config, tensors, folder)
    with torch.no_grad():
        for delta, own in swaps:
            _swap_one(delta, config, own)
        for key, target in _extra_tensors(model, name).items():
            target.copy_(tensors[key])
    adapter_state(model).configs[name] = swaps[0][0].config if isinstance(swaps[0][0], SwapsRank) else config
    return model


def _read_folder(folder: Path, allow_nonfinite: bool) -> tuple[DeltaConfig, dict[str, Tensor]]:
    if not (folder / CONFIG_FILE).is_file():
        raise HotSwapError(f"{folder} holds no {CONFIG_FILE}: hot-swapping reads deltatune adapter folders; load "
                           "another format once with deltatune.load_adapter and save it with save_adapter")
    return read_deltatune_folder(folder, allow_nonfinite=allow_nonfinite)


def _check_method(current: DeltaConfig, config: DeltaConfig, folder: Path) -> None:
    if type(config) is not type(current):
        raise HotSwapError(f"{folder} is a {entry_for_config(config).name} adapter but the loaded one is "
                           f"{entry_for_config(current).name}; hot-swapping keeps the method: load it as a new "
                           "adapter instead")


def _planned_swaps(model: nn.Module, name: str, config: DeltaConfig, tensors: dict[str, Tensor],
                   folder: Path) -> list[tuple[Delta, dict[str, Tensor]]]:
    """(delta, its tensors from the file by their own names) for every delta of `name`, after every check."""
    current = _config_of(model, name)
    deltas = list(iter_deltas(model, name))
    _check_fields(current, config, deltas[0][2], folder)
    expected = set(adapter_state_dict(model, name))
    extra = sorted(set(tensors) - expected - set(running_statistics(model)))
    if extra:
        raise HotSwapError(f"{folder} has tensor {extra[0]!r} that adapter {name!r} has no place for: it adapts "
                           "other modules (targets differ); load it as a new adapter instead")
    swaps = []
    for path, _, delta in deltas:
        missing = [key for key in delta.state_dict() if f"{path}.{key}" not in tensors]
        if missing:
            raise HotSwapError(f"{folder} has no tensor {path}.{missing[0]}: it does not adapt module {path!r} as "
                               f"adapter {name!r} does (targets differ); load it as a new adapter instead")
        own = {key: tensors[f"{path}.{key}"] for key in delta.state_dict()}
        _check_one(delta, config, own, path)
        swaps.append((delta, own))
    for key, target in _extra_tensors(model, name).items():
        _check_shape(tensors, key, target, "module")
    return swaps


def _check_fields(current: DeltaConfig, config: DeltaConfig, delta: Delta, folder: Path) -> None:
    swappable = set(delta.hot_swappable_fields) if isinstance(delta, SwapsRank) else set()
    old, new = current.to_dict(), config.to_dict()
    differ = [key for key in old if key not in _TARGETING | swappable and old[key] != new.get(key)]
    if differ:
        allowed = f" (only {sorted(swappable)} may differ)" if swappable else ""
        raise HotSwapError(f"{folder} has {differ[0]}={new.get(differ[0])!r} but the loaded adapter has "
                           f"{old[differ[0]]!r}{allowed}; load it as a new adapter instead")


def _check_one(delta: Delta, config: DeltaConfig, own: dict[str, Tensor], path: str) -> None:
    if isinstance(delta, SwapsRank):
        delta.check_swap(config, own)
        return
    for key, target in delta.state_dict().items():
        _check_shape(own, key, target, path)


def _check_shape(tensors: dict[str, Tensor], key: str, target: Tensor, where: str) -> None:
    if key not in tensors:
        raise HotSwapError(f"the new adapter has no tensor {key!r} for {where}; it was saved for another model")
    saved = tensors[key]
    if tuple(saved.shape) != tuple(target.shape) or saved.is_floating_point() != target.is_floating_point():
        raise HotSwapError(f"tensor {key!r} for {where} has shape {tuple(tensors[key].shape)} and dtype "
                           f"{tensors[key].dtype}, the loaded adapter {tuple(target.shape)} and {target.dtype}; "
                           "it was saved for another model")


def _swap_one(delta: Delta, config: DeltaConfig, own: dict[str, Tensor]) -> None:
    if isinstance(delta, SwapsRank):
        delta.swap_in(config, own)
        return
    for key, target in delta.state_dict(keep_vars=True).items():
        target.copy_(own[key])


def _extra_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The adapter's tensors outside its deltas (extra trainable modules such as a head), by their keys."""
    delta_keys = {f"{path}.{key}" for path, _, delta in iter_deltas(model, name) for key in delta.state_dict()}
    return {key: tensor for key, tensor in adapter_state_dict(model, name).items() if key not in delta_keys}

"""Model-level operations: inject and remove deltas, choose active adapters, merge, freeze, count."""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deltatune.core.capabilities import KeepsBaseInEval, is_quantized
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta
from deltatune.core.guards import install_guards, remove_guards
from deltatune.core.host import AdaptedLayer, plain_path
from deltatune.core.init_from import fill_from_adapter
from deltatune.core.layers import describe_target
from deltatune.core.registry import entry_for_config
from deltatune.core.targets import _is_inside, find_targets
from deltatune.core.ties import refuse_or_untie, refuse_tied_merge, untie_parameters
from deltatune.errors import AdapterNameError, ConfigError, DeltatuneError, TargetError, TrainingError

_STATE_ATTR = "_deltatune_state"


@dataclass
class AdapterState:
    """What deltatune remembers on an adapted model: each adapter's config and the active set."""

    configs: dict[str, DeltaConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()


def adapter_state(model: nn.Module) -> AdapterState:
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = AdapterState()
        object.__setattr__(model, _STATE_ATTR, state)
    return state


def iter_hosts(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(path, host) for every adapted layer. A host inside another host's base module (LoRA on a projection of
    a block that hosts VPT or IAA) gets the path it has in the plain model, without the outer host's
    `base_layer` step, so adapter keys and paths do not depend on what else is adapted."""
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield plain_path(model, path), module


def iter_deltas(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, str, Delta]]:
    """(module path, adapter name, delta) for every delta, or only adapter `name`'s."""
    for path, host in iter_hosts(model):
        for adapter, delta in host.deltas.items():
            if name is None or adapter == name:
                yield path, adapter, delta


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterNameError(f"adapter name {name!r} is invalid: use a Python identifier such as 'default'")
    if name in adapter_state(model).configs:
        raise AdapterNameError(
            f"an adapter named {name!r} already exists on this model; pick another name or call "
            f"deltatune.delete_adapter(model, {name!r}) first"
        )


def _host_for(model: nn.Module, path: str) -> AdaptedLayer:
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLayer):
        return module
    try:
        layer = describe_target(module)
    except ValueError as error:
        raise TargetError(f"cannot adapt {path!r}: {error}; exclude it from `targets`") from None
    host = AdaptedLayer(module, layer)
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, host)
    return host


def adapt(
    model: nn.Module, config: DeltaConfig, name: str = "default", *, trainable: bool = True,
    init_from: str | os.PathLike | dict[str, Tensor] | None = None,
) -> nn.Module:
    """Add adapter `name` of `config`'s method to `model` in place and make it the only active adapter.

    With `trainable=True` every parameter is frozen except the new deltas and `config.extra_trainable`
    modules. `init_from` (a saved adapter folder, or its tensors as `adapter_state_dict` gives them) sets the
    new deltas' tensors from an adapter trained elsewhere, e.g. prompts pre-trained on a source task (PVP);
    every delta tensor must be there with the same shape (extra_trainable modules such as a head are not
    read: a new task usually has a new head). Returns the same model object.
    """
    if not isinstance(config, DeltaConfig):
        raise ConfigError(f"config must be a method config such as LoRAConfig(), got {type(config).__name__}")
    entry = entry_for_config(config)
    _check_new_name(model, name)
    paths = find_targets(model, config, entry.delta_cls.layer_kinds, entry.name)
    ties = refuse_or_untie(model, paths, config.untie, entry.name)
    deltas = []
    for path in paths:  # build every delta before touching the model, so a bad config changes nothing
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        delta = entry.delta_cls(config, describe_target(base), path)
        reference = _reference_tensor(base, model)
        delta.to(device=reference.device, dtype=_float_dtype(reference))
        delta.init_from_module(base)
        deltas.append((path, delta))
    if init_from is not None:  # PVP: start from a trained adapter's tensors (before anything is attached)
        fill_from_adapter(deltas, init_from)
    untie_parameters(model, ties)
    for path, delta in deltas:
        _host_for(model, path).add_delta(name, delta)
    state = adapter_state(model)
    state.configs[name] = config
    install_guards(model)
    set_active(model, [name])
    if trainable:
        set_trainable(model, name)
    return model


def _reference_tensor(base: nn.Module, model: nn.Module) -> Tensor:
    """The tensor whose device and dtype a new delta follows: the base layer's weight, else the hosted
    module's first parameter, else the model's (a weightless MODULE host such as a parameter-free block)."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, Tensor):
        return weight
    for parameter in itertools.chain(base.parameters(), model.parameters()):
        return parameter
    raise TargetError("the model has no parameters to take a device and dtype from; adapt a model with weights")


def _float_dtype(weight: Tensor) -> torch.dtype | None:
    """Deltas follow the base weight's floating dtype (float64 models get float64 deltas)."""
    return weight.dtype if weight.is_floating_point() else None


def set_trainable(model: nn.Module, name: str) -> None:
    """Freeze everything, then unfreeze adapter `name`'s deltas and its config's extra_trainable modules."""
    config = _config_of(model, name)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, _, delta in iter_deltas(model, name):
        for parameter in delta.parameters():
            parameter.requires_grad_(True)
    for path, module in extra_modules(model, config):
        _refuse_training_quantized(module, path)
        for parameter in module.parameters():
            parameter.requires_grad_(True)


def _refuse_training_quantized(module: nn.Module, path: str) -> None:
    """An extra trainable module must not hold a quantized base layer: its weight is codes, not a parameter, so
    "training" it would train its bias alone, silently."""
    for inner_path, inner in module.named_modules():
        if is_quantized(inner):
            where = ".".join(p for p in (path, inner_path.replace("base_layer.", "").removesuffix(".base_layer")) if p)
            bits = getattr(inner, "bits", "?")
            raise TrainingError(
                f"extra_trainable names {path or 'the model'}, which holds {where}, a {bits}-bit quantized "
                "frozen layer whose weight cannot train: leave it out of extra_trainable (train a delta on it), or "
                "call deltatune.dequantize_base(model) first"
            )


def extra_modules(model: nn.Module, config: DeltaConfig) -> list[tuple[str, nn.Module]]:
    """The outermost modules named by `config.extra_trainable` (trained and saved with the adapter)."""
    found = []
    for path, module in model.named_modules():
        if path and _is_inside(path, config.extra_trainable) and not any(path.startswith(p + ".") for p, _ in found):
            found.append((path, module))
    missing = [n for n in config.extra_trainable if not any(p == n or p.endswith("." + n) for p, _ in found)]
    if missing:
        raise TargetError(f"extra_trainable names {missing} match no module; check the module names")
    return found


def _config_of(model: nn.Module, name: str) -> DeltaConfig:
    configs = adapter_state(model).configs
    if name not in configs:
        known = ", ".join(configs) or "none"
        raise AdapterNameError(f"no adapter named {name!r} on this model (adapters: {known})")
    return configs[name]


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make exactly these adapters active (their deltas compose in forward)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        _config_of(model, name)
    for _, host in iter_hosts(model):
        host.set_active(names)
    adapter_state(model).active = names


def set_training_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except where an active delta has `KeepsBaseInEval`: then the frozen modules stay in eval
    mode and only the deltas and the modules with trainable parameters (a head) train. The trainer calls this
    instead of `model.train()`."""
    model.train()
    if not any(_keeps_base_in_eval(host.deltas[name]) for _, host in iter_hosts(model) for name in host.active):
        return model
    model.eval()
    for module in model.modules():
        if isinstance(module, Delta) or any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    return model


def _keeps_base_in_eval(delta: Delta) -> bool:
    return isinstance(delta, KeepsBaseInEval) and delta.keeps_base_in_eval()


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return adapter_state(model).active


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: inside this block every adapter is bypassed."""
    hosts = [host for _, host in iter_hosts(model)]
    if any(host.merged for host in hosts):
        raise DeltatuneError("adapters are merged into the weights; call deltatune.unmerge(model) before disabling")
    previous = [host.disabled for host in hosts]
    for host in hosts:
        host.disabled = True
    try:
        yield model
    finally:
        for host, was in zip(hosts, previous):
            host.disabled = was


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (forward is then the plain layers' cost). All or nothing:
    when one layer's delta cannot be merged, no layer is (those merged before it are unmerged again)."""
    _merge_all_or_none(model)
    return model


def _merge_all_or_none(model: nn.Module) -> None:
    _refuse_tied_merge(model)
    hosts = [host for _, host in iter_hosts(model)]
    for host in hosts:
        host.check_mergeable()
    done: list[tuple[AdaptedLayer, int]] = []
    try:
        for host in hosts:
            done.append((host, len(host.merge())))
    except Exception:  # a refusal (or any failure) half way: the layers merged so far go back
        for host, count in reversed(done):
            host.unmerge(count)
        raise


def _refuse_tied_merge(model: nn.Module) -> None:
    refuse_tied_merge(model, [path for path, host in iter_hosts(model) if host._merge_order()])


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: base weights are restored (exactly up to float rounding)."""
    for _, host in iter_hosts(model):
        host.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every wrapper, leaving plain modules. With merge=True the active adapters are folded in first;
    with merge=False the base weights are restored. Returns the same model object, now free of deltatune."""
    if merge:
        _merge_all_or_none(model)  # every layer or none, before any wrapper is removed
    for path, host in list(iter_hosts(model)):
        if not merge:
            host.unmerge()
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, host.base_layer)
    if hasattr(model, _STATE_ATTR):
        object.__delattr__(model, _STATE_ATTR)
    remove_guards(model)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`'s deltas; hosts left without deltas are replaced by their base layer."""
    _config_of(model, name)
    for path, host in list(iter_hosts(model)):
        if name in host.deltas:
            host.remove_delta(name)
        if not len(host.deltas):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, host.base_layer)
    state = adapter_state(model)
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable%: {100 * self.share:.4f}")


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count trainable vs all parameters (each shared tensor once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return ParameterCount(trainable, sum(p.numel() for p in seen.values()))


def regularization_loss(model: nn.Module) -> Tensor:
    """Sum of the active deltas' regularizers (0 when none): the trainer adds it to the task loss."""
    total: Tensor | None = None
    for _, host in iter_hosts(model):
        for name in host.active:
            term = host.deltas[name].regularization()
            if term is not None:
                total = term if total is None else total + term
    if total is None:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=None if parameter is None else parameter.device)
    return total

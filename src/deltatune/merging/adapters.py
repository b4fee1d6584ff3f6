"""The delta algebra on adapters: combine named adapters of one model into a new LoRA adapter.

Per adapted layer, each adapter's ΔW_i (any method: the delta contract's `delta_weight`) is a task vector with
base 0; a registered merge method (task arithmetic, TIES, DARE, PCB, ... — the same functions that merge
checkpoints) combines them into one ΔW, and a truncated SVD turns ΔW into the factors of a new LoRA adapter
(`AssignsDeltaWeight`, core.capabilities). A bias term (the contract's `delta_bias`: BitFit's whole update) is
combined the same way, as one more tensor per layer, and carried by the new adapter's bias
(`LoRAConfig(bias=True)`). This is peft's `add_weighted_adapter` with its `svd` / `ties_svd` /
`dare_*_svd` combination types, for every deltatune method and merge method. peft's `ties_svd` is
`method="ties", params=TiesParams(trim_scope="tensor", normalize="count")` and its `magnitude_prune_svd` is
`method="magnitude_prune"` (equal outputs in the tests, weights and density as in peft).

With `task_arithmetic` and a rank of at least the sum of the LoRA adapters' ranks the result is exact:
Σ w_i ΔW_i has rank ≤ Σ r_i, so it equals peft's lossless `cat` combination.

    combine_adapters(model, ["math", "code"], "both", weights=[0.7, 0.3])          # exact, rank r_1 + r_2
    combine_adapters(model, ["math", "code"], "both", method="ties", density=0.2, rank=8)  # TIES on ΔW, rank 8
    deltatune.set_active(model, "both")
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.capabilities import AssignsDeltaBias, AssignsDeltaWeight, HasRank
from deltatune.core.layers import base_bias
from deltatune.core.model import active_adapters, adapt, adapter_state, iter_hosts, set_active
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.merging.memory import merge_state_dicts
from deltatune.merging.registry import merge_method
from deltatune.methods.lora import LoRAConfig


def combine_adapters(model: nn.Module, adapters: Sequence[str], new_name: str, *, method: str = "task_arithmetic",
                     weights: Sequence[float] | None = None, density: float | None = None, rank: int | None = None,
                     alpha: float | None = None, params: Any = None, model_params: Sequence[Any] | None = None,
                     seed: int = 0) -> nn.Module:
    """Add LoRA adapter `new_name` whose ΔW on every layer is `method` applied to the adapters' ΔW.

    Args:
        adapters: names of adapters already on `model`; they must adapt the same modules.
        method: a registered merge method (`deltatune.merging.list_merge_methods()`); its paper defaults apply.
        weights: one coefficient per adapter (default 1.0 each); ignored when `model_params` is given.
        density: the share of entries each adapter's ΔW keeps, for methods that trim (TIES, DARE, magnitude
            pruning, ...; their paper default otherwise), as peft's `add_weighted_adapter(density=...)`.
            Task arithmetic accepts and ignores it (mergekit's and peft's convention).
        rank: the new adapter's rank. Default: the largest per-layer sum of the adapters' live ranks (`HasRank`:
            exact for task arithmetic on LoRA-family adapters, AdaLoRA's pruned ranks included); required when an
            adapter has no rank (sparse methods, BitFit).
        alpha: the new adapter's alpha (default: `rank`, so its scale is 1).
        params / model_params: the merge method's dataclasses, e.g. `TiesParams()`, `[TiesModelParams(...)]`.
        seed: seeds the random methods (DARE's drops), per layer.

    The adapters are left untouched, and so is the active set: `deltatune.set_active(model, new_name)` to use
    the result. Extra trainable modules (heads) are not combined. Returns `model`.
    """
    adapters = list(adapters)
    spec = merge_method(method)
    _check_adapters(model, adapters, new_name)
    if model_params is None:
        weights = [1.0] * len(adapters) if weights is None else list(weights)
        if len(weights) != len(adapters):
            raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters; give one per adapter")
        model_params = [spec.model_params_cls(weight=float(w), **_density_field(spec, density)) for w in weights]
    elif density is not None:
        raise ConfigError("density is ignored when model_params is given; set the density in each model_params")
    hosts = _hosts_with(model, adapters)
    biased = _biased_paths(hosts, adapters)
    deltas = [_task_vectors(hosts, name, biased) for name in adapters]
    zeros = {key: torch.zeros_like(tensor) for key, tensor in deltas[0].items()}
    combined = merge_state_dicts(method, zeros, deltas, params, model_params, seed=seed)
    rank = rank if rank is not None else _summed_rank(hosts, adapters)
    previous = active_adapters(model)
    # one regular expression matching exactly these paths (a name list would also match longer paths by suffix)
    exact_paths = "|".join(re.escape(path) for path in hosts)
    config = LoRAConfig(rank=rank, alpha=float(alpha if alpha is not None else rank), targets=exact_paths,
                        bias=bool(biased))
    adapt(model, config, new_name, trainable=False)
    for path, host in hosts.items():
        _assign(host.deltas[new_name], combined, path)
    set_active(model, previous)
    return model


BIAS_SUFFIX = ".bias"  # a layer's Δb is combined under "<module path>.bias", beside its ΔW under "<module path>"


def _biased_paths(hosts: dict[str, Any], adapters: list[str]) -> set[str]:
    """Layers on which some adapter changes the bias (`delta_bias` is not None)."""
    return {path for path, host in hosts.items()
            if any(host.deltas[n].delta_bias(base_bias(host.base_layer)) is not None for n in adapters)}


def _task_vectors(hosts: dict[str, Any], name: str, biased: set[str]) -> dict[str, Tensor]:
    """Adapter `name` as a task vector: ΔW per layer, plus Δb (zeros where it has none) on the biased layers."""
    vectors = {}
    for path, host in hosts.items():
        delta = host.deltas[name]
        vectors[path] = delta.delta_weight(host.base_layer.weight).detach()
        if path in biased:
            change = delta.delta_bias(base_bias(host.base_layer))
            vectors[path + BIAS_SUFFIX] = (torch.zeros(host.layer.out_features, dtype=vectors[path].dtype,
                                                       device=vectors[path].device)
                                           if change is None else change.detach().to(vectors[path].dtype))
    return vectors


def _assign(delta: Any, combined: dict[str, Tensor], path: str) -> None:
    if not isinstance(delta, AssignsDeltaWeight):
        raise ConfigError(f"{type(delta).__name__} cannot be set from a ΔW; combine into a LoRA adapter")
    delta.assign_delta_weight(combined[path])
    if path + BIAS_SUFFIX in combined:
        if not isinstance(delta, AssignsDeltaBias):
            raise ConfigError(f"{type(delta).__name__} cannot be set from a Δb; combine into a LoRA adapter")
        delta.assign_delta_bias(combined[path + BIAS_SUFFIX])


def _density_field(spec: Any, density: float | None) -> dict[str, float]:
    if density is None:
        return {}
    fields = {f.name for f in dataclasses.fields(spec.model_params_cls)}
    if "density" not in fields:
        raise ConfigError(f"merge method {spec.name!r} does not trim, so density={density} has no meaning; drop it "
                          "or pick a method that trims (ties, dare_linear, dare_ties, magnitude_prune, ...)")
    return {"density": float(density)}


def _check_adapters(model: nn.Module, adapters: list[str], new_name: str) -> None:
    known = list(adapter_state(model).configs)
    missing = [name for name in adapters if name not in known]
    if missing:
        raise AdapterNameError(f"no adapter named {missing[0]!r} on this model; its adapters are {sorted(known)}")
    if not adapters:
        raise ConfigError("adapters is empty: name at least one adapter to combine")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"adapters {adapters} name an adapter twice; list each adapter once")
    if new_name in known:
        raise AdapterNameError(f"an adapter named {new_name!r} already exists on this model; pick another new_name")


def _hosts_with(model: nn.Module, adapters: list[str]) -> dict[str, Any]:
    """The adapted layers of the adapters; an error names the first layer that only some adapters adapt."""
    hosts = {}
    for path, host in iter_hosts(model):
        present = [name for name in adapters if name in host.deltas]
        if present and len(present) != len(adapters):
            absent = next(name for name in adapters if name not in host.deltas)
            raise ConfigError(
                f"adapters {adapters} do not adapt the same modules: {path!r} has {present} but not {absent!r}; "
                "combine adapters with the same targets"
            )
        if present and any(name in host.merged for name in adapters):
            raise ConfigError(f"adapters are merged into {path!r}; call deltatune.unmerge(model) first")
        if present:
            hosts[path] = host
    return hosts


def _summed_rank(hosts: dict[str, Any], adapters: list[str]) -> int:
    """The largest, over layers, sum of the adapters' live ranks: Σ w_i ΔW_i has at most that rank there."""
    totals = []
    for host in hosts.values():
        deltas = [host.deltas[name] for name in adapters]
        if not all(isinstance(delta, HasRank) for delta in deltas):
            raise ConfigError(f"adapters {adapters} do not all have a rank; pass rank= for the combined LoRA adapter")
        totals.append(sum(delta.rank for delta in deltas))
    return max(max(totals, default=1), 1)


def adapter_delta_weights(model: nn.Module, name: str) -> dict[str, Tensor]:
    """ΔW of adapter `name` on every layer it adapts ({module path: tensor in the base weight's shape}); its
    bias term, if any, is `Delta.delta_bias(base_bias)`."""
    return {path: host.deltas[name].delta_weight(host.base_layer.weight).detach()
            for path, host in iter_hosts(model) if name in host.deltas}

"""What the allocators decided: per-module ranks of every adapter with rank components (for `deltatune inspect`)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.allocate.protocols import HasRankComponents
from deltatune.core.model import iter_deltas

MASK_KEY = "rank_mask"
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def describe_allocation(model: nn.Module) -> dict[str, Any]:
    """{adapter: {"modules": {path: {"rank", "capacity", "parameters"}}, "total_rank", "capacity",
    "parameters", "mean_rank"}} for every adapter whose deltas have rank components (others are left out)."""
    adapters: dict[str, Any] = {}
    for path, adapter, delta in iter_deltas(model):
        if not isinstance(delta, HasRankComponents):
            continue
        entry = adapters.setdefault(adapter, {"modules": {}})
        entry["modules"][path] = {"rank": delta.rank, "capacity": delta.rank_capacity,
                                  "parameters": delta.live_parameter_count()}
    for entry in adapters.values():
        modules = entry["modules"].values()
        entry["total_rank"] = sum(m["rank"] for m in modules)
        entry["capacity"] = sum(m["capacity"] for m in modules)
        entry["parameters"] = sum(m["parameters"] for m in modules)
        entry["mean_rank"] = entry["total_rank"] / max(len(entry["modules"]), 1)
    return adapters


def ranks_from_tensors(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Module path -> live rank, read from an adapter file's tensors (keys ending in ".rank_mask")."""
    suffix = "." + MASK_KEY
    return {key[: -len(suffix)]: int(torch.as_tensor(value).bool().sum())
            for key, value in sorted(tensors.items()) if key.endswith(suffix)}


def ranks_of(model_or_ranks: nn.Module | Mapping[str, int], adapter: str | None = None) -> dict[str, int]:
    """Module path -> rank, from a model (its first rank-component adapter, or `adapter`) or a mapping."""
    if isinstance(model_or_ranks, nn.Module):
        described = describe_allocation(model_or_ranks)
        if not described:
            return {}
        chosen = described[adapter] if adapter is not None else next(iter(described.values()))
        return {path: info["rank"] for path, info in chosen["modules"].items()}
    return {str(k): int(v) for k, v in model_or_ranks.items()}


def layer_and_module(path: str) -> tuple[str, str]:
    """'encoder.layer.3.attention.self.query' -> ('3', 'attention.self.query'); no index -> ('-', path)."""
    match = _LAYER_INDEX.search(path)
    if match is None:
        return "-", path
    module = path[match.end():] if match.end() < len(path) else path[: match.start()]
    return match.group(1), module or path


def rank_table(ranks: Mapping[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """(layer labels, module labels, grid) with NaN where a layer lacks a module; layers sorted numerically."""
    cells: dict[tuple[str, str], int] = {}
    for path, rank in ranks.items():
        cells[layer_and_module(path)] = rank
    layers = sorted({layer for layer, _ in cells}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
    modules = sorted({module for _, module in cells})
    grid = [[float(cells.get((layer, module), float("nan"))) for module in modules] for layer in layers]
    return layers, modules, grid

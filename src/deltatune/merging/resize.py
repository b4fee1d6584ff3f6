"""Resize a peft LoRA folder to a smaller fixed rank or an adaptive per-layer rank, exactly and without ΔW.

For each adapted layer ΔW = s · B A (s = lora_alpha / r, or / √r with rsLoRA, per layer through rank_pattern /
alpha_pattern), the thin QR factorizations B = Q_B R_B and Aᵀ = Q_A R_A give ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ, and the
SVD of the r × r core gives the exact SVD of ΔW (`algebra.lowrank.resized_factors`): the dense (out, in) product is
never formed, so a layer costs O((out + in) r²). The same rank rules as `extract_lora` apply (fixed rank, energy,
sv_ratio; a rank never grows: a fixed rank above a layer's rank keeps that rank), the truncated factors are split
√σ / √σ, and the result is written with scale 1 (lora_alpha = r), as `extract_lora` writes it.

Kept as they are: modules_to_save tensors. ``lora_B.bias`` (peft scales it with the branch) is multiplied by the
old scale, since the new scale is 1. Refused by name: DoRA (its magnitude depends on the whole W + ΔW) and
initializations that rewrite the base (PiSSA, OLoRA, ...), whose A and B are not a delta on the original base.
The report is `extract_lora`'s, with errors relative to the input adapter's own ΔW.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from deltatune.core.atomic import atomic_directory
from deltatune.errors import AdapterFileError, ConfigError
from deltatune.merging.algebra.lowrank import RankRule, resized_factors
from deltatune.merging.extract import DTYPES, ExtractReport
from deltatune.merging.io.checkpoint import Checkpoint
from deltatune.merging.io.lora_folder import (
    LAYOUTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PREFIX,
    REPORT_NAME,
    TOOL_FIELD,
    SpooledTensors,
    check_replaceable,
    pad_rank,
    peft_lora_config,
    totals_of,
    write_json,
)
from deltatune.merging.io.validate import check_output_location
from deltatune.methods.lora_peft import pattern_value

TOOL = "deltatune resize-lora"
PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except OSError:
        raise AdapterFileError(f"{folder} has no readable {PEFT_CONFIG}; pass a peft LoRA folder") from None
    except ValueError:
        raise AdapterFileError(f"{folder / PEFT_CONFIG} is not valid JSON; fix or re-save the adapter") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{folder / PEFT_CONFIG} is not a peft LoRA config (peft_type "
                               f"{config.get('peft_type') if isinstance(config, dict) else None!r}); resize_lora "
                               "reads LoRA adapters only")
    if config.get("use_dora"):
        raise ConfigError(f"{folder} is a DoRA adapter: its magnitude vector depends on W + ΔW, so a resized B A "
                          "would change it; resize_lora supports plain LoRA only")
    init = config.get("init_lora_weights", True)
    if not (init is True or init is False or init in ("gaussian", "orthogonal", "eva")):
        raise ConfigError(f"{folder} was initialized with init_lora_weights={init!r}, which rewrites the base "
                          "weights; convert it to a plain LoRA with peft first (save_pretrained with "
                          "path_initial_model_for_weight_conversion)")
    return config


def _scale(config: dict[str, Any], path: str) -> float:
    """One layer's s = lora_alpha / r (or / √r) by peft's rank_pattern / alpha_pattern rule (`pattern_value`)."""
    rank = pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pairs(adapter: Checkpoint) -> dict[str, tuple[str, str]]:
    """Module path (without peft's prefix) -> (A key, B key)."""
    found: dict[str, tuple[str, str]] = {}
    for name in adapter.tensors:
        for suffix_a, suffix_b in PAIRS:
            if name.endswith(suffix_a):
                stem = name[: -len(suffix_a)]
                if stem + suffix_b not in adapter.tensors:
                    raise AdapterFileError(f"{adapter.path}: {name!r} has no {stem + suffix_b!r}; the adapter file "
                                           "is incomplete, re-save it")
                found[stem.removeprefix(PREFIX)] = (name, stem + suffix_b)
    if not found:
        raise AdapterFileError(f"{adapter.path} holds no lora_A / lora_B tensors; it adapts nothing")
    return found


def resize_lora(adapter: str | Path, out_dir: str | Path, *, rank: int | None = None, energy: float | None = None,
                sv_ratio: float | None = None, max_rank: int | None = None, layout: str = "padded",
                compute_dtype: str = "float64", overwrite: bool = False) -> ExtractReport:
    """Resize the peft LoRA folder `adapter` into `out_dir` (see the module docstring; the arguments are
    `extract_lora`'s). The core SVDs are r × r, so float64 is the default compute dtype."""
    started = time.perf_counter()
    rule = RankRule(rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank)
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is invalid: expected one of {LAYOUTS}")
    if compute_dtype not in ("float32", "float64"):
        raise ConfigError(f"compute_dtype={compute_dtype!r} is invalid: expected 'float32' or 'float64'")
    folder = Path(adapter)
    config = _read_config(folder)
    weights = Checkpoint(folder / PEFT_WEIGHTS, "adapter")
    out = Path(out_dir)
    check_output_location(out, [weights], overwrite=True)
    if out.resolve() == folder.resolve():
        raise ConfigError(f"out_dir {out} is the input adapter; inputs are never modified, choose another folder")
    check_replaceable(out, overwrite, TOOL)
    pairs = _pairs(weights)
    try:
        with atomic_directory(out) as staging:
            spool = SpooledTensors(staging / ".spool")
            rows, ranks, axes = _resize_layers(weights, config, pairs, rule, DTYPES[compute_dtype], spool)
            _copy_others(weights, config, pairs, spool)
            top = max(ranks.values())
            shapes, reshape = _padding(spool, axes, top, layout, rows)
            stored = spool.finish(staging / PEFT_WEIGHTS, reshape, shapes)
            new_config = _output_config(config, ranks, layout, any(k.endswith(".lora_B.bias") for k in spool.names()))
            write_json(staging / PEFT_CONFIG, new_config)
            totals = totals_of(rows) | {"stored_bytes": stored, "layout": layout}
            report = ExtractReport(out, rows, [], [], totals, time.perf_counter() - started)
            write_json(staging / REPORT_NAME, {TOOL_FIELD: TOOL, "adapter": str(folder), "rule": asdict(rule),
                                               "layers": rows, "totals": totals, "seconds": report.seconds})
    finally:
        weights.close()
    return report


def _resize_layers(weights: Checkpoint, config: dict[str, Any], pairs: dict[str, tuple[str, str]], rule: RankRule,
                   compute: torch.dtype, spool: SpooledTensors):
    rows, ranks, axes = [], {}, {}
    for path, (key_a, key_b) in sorted(pairs.items()):
        down, up = weights.read(key_a), weights.read(key_b)
        native_a, native_b = down.shape, up.shape  # a convolution's A is (r, in, *kernel), B (out, r, 1, ...)
        old_rank = down.shape[0]
        # a rank never grows: choose_rank caps it at the r singular values of the core
        fit = resized_factors(down.reshape(old_rank, -1), up.reshape(up.shape[0], old_rank), _scale(config, path),
                              rule, compute_dtype=compute)
        shape = (up.shape[0], down[0].numel())
        rows.append({"name": path, "shape": list(shape), "rank": fit.rank, "input_rank": old_rank,
                     "full_rank": min(shape), "relative_error": fit.relative_error, "energy_kept": fit.energy_kept,
                     "norm": fit.norm, "error": fit.error, "parameters": fit.rank * (shape[0] + shape[1])})
        if fit.rank == 0:
            continue
        spool.add(key_a, fit.down.to(down.dtype).reshape(fit.rank, *native_a[1:]).contiguous())
        spool.add(key_b, fit.up.to(up.dtype).reshape(native_b[0], fit.rank, *native_b[2:]).contiguous())
        ranks[path], axes[key_a], axes[key_b] = fit.rank, 0, 1
    if not ranks:
        raise ConfigError(f"every layer of {weights.path} has ΔW = 0; nothing to resize")
    return rows, ranks, axes


def _copy_others(weights: Checkpoint, config: dict[str, Any], pairs: dict[str, tuple[str, str]],
                 spool: SpooledTensors) -> None:
    """modules_to_save as they are; lora_B.bias times the old scale (the new one is 1)."""
    factor_keys = {key for pair in pairs.values() for key in pair}
    for name in weights.names_in_file_order():
        if name in factor_keys:
            continue
        tensor = weights.read(name)
        if name.endswith(".lora_B.bias"):
            path = name[: -len(".lora_B.bias")].removeprefix(PREFIX)
            if path not in pairs:
                raise AdapterFileError(f"{weights.path}: {name!r} has no lora_B.weight beside it; re-save the adapter")
            tensor = (tensor.double() * _scale(config, path)).to(tensor.dtype)
        spool.add(name, tensor)


def _padding(spool: SpooledTensors, axes: dict[str, int], top: int, layout: str, rows: list[dict[str, Any]]):
    if layout != "padded":
        return {}, None
    for row in rows:
        if row["rank"] and top > row["full_rank"]:
            raise ConfigError(f"layout='padded' stores every layer at rank {top}, above the full rank "
                              f"{row['full_rank']} of {row['name']!r}; use layout='pattern'")
    shapes = {}
    for key, axis in axes.items():
        shape = list(spool.shape(key))
        shape[axis] = top
        shapes[key] = tuple(shape)
    return shapes, lambda name, tensor: pad_rank(tensor, top, axes[name]) if name in axes else tensor


def _output_config(config: dict[str, Any], ranks: dict[str, int], layout: str, bias: bool) -> dict[str, Any]:
    """The input's config with the new ranks at scale 1 (everything else, e.g. modules_to_save, kept)."""
    stored = ranks if layout == "pattern" else dict.fromkeys(ranks, max(ranks.values()))
    fresh = peft_lora_config(stored, layout, list(config.get("modules_to_save") or []), bias=bias,
                             base_model=config.get("base_model_name_or_path"), task_type=config.get("task_type"))
    return {**config, **fresh}

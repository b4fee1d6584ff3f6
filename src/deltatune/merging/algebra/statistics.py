"""Exact whole-model order statistics in two streaming passes, with memory independent of model size.

The TIES paper trims each task vector to its top-k% over the **whole model**, and PCB normalises over the whole
flattened model; both need, per model, the r-th largest of a score over billions of entries. Sorting them all
would need the whole model in memory. Instead, float32 scores are mapped to 32-bit keys whose integer order is
the float order; a first pass counts keys by their top 16 bits (65,536 bins), which tells the bin holding the
r-th largest; a second pass counts the low 16 bits inside that bin only, which gives the exact key. Memory:
two histograms per requested rank; time: two reads of the inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from deltatune.errors import ConfigError

BINS = 1 << 16


def sortable_keys(values: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) ordered like the float32 values (−0.0 counts as +0.0; NaN not supported)."""
    bits = (values.detach().float().reshape(-1) + 0.0).view(torch.int32).to(torch.int64)  # -0.0 + 0.0 = +0.0
    return torch.where(bits >= 0, bits + (1 << 31), -1 - bits)


def key_to_float(key: int) -> float:
    bits = key - (1 << 31) if key >= (1 << 31) else -1 - key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _locate(histogram: Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the rank-th largest entry, rank within that bin), ranks counted from the top, 1-based."""
    from_top = torch.flip(histogram, [0]).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    above = int(from_top[position - 1]) if position > 0 else 0
    return BINS - 1 - position, rank - above


def order_statistics(score_groups: Callable[[], Iterable[Sequence[Tensor]]], ranks: Sequence[Sequence[int]]
                     ) -> list[tuple[float, ...]]:
    """Per model m, the r-th largest score (1-based) for each r in ranks[m], over every group yielded.

    score_groups() must yield, on every call, the same sequence of per-model score lists (one tensor per model).
    """
    models = len(ranks)
    high = [torch.zeros(BINS, dtype=torch.int64) for _ in range(models)]
    totals = [0] * models
    for scores in score_groups():
        for m, score in enumerate(scores):
            high[m] += torch.bincount((sortable_keys(score) >> 16), minlength=BINS)
            totals[m] += score.numel()
    targets = []
    for m in range(models):
        for rank in ranks[m]:
            if not 1 <= rank <= totals[m]:
                raise ConfigError(f"rank {rank} outside 1..{totals[m]}")
            targets.append((m, *_locate(high[m], rank)))
    low = [torch.zeros(BINS, dtype=torch.int64) for _ in targets]
    for scores in score_groups():
        keys = [sortable_keys(score) for score in scores]
        for target, (m, bin_index, _) in enumerate(targets):
            inside = keys[m][(keys[m] >> 16) == bin_index]
            if inside.numel():
                low[target] += torch.bincount(inside & (BINS - 1), minlength=BINS)
    values: list[list[float]] = [[] for _ in range(models)]
    for target, (m, bin_index, rank_in_bin) in enumerate(targets):
        low_bits, _ = _locate(low[target], rank_in_bin)
        values[m].append(key_to_float((bin_index << 16) | low_bits))
    return [tuple(v) for v in values]

"""Which examples each process reads at each step: deterministic from (seed, epoch, step, rank).

Every epoch draws one permutation of the training set from a generator seeded with `seed + epoch`. Global
batch b of the epoch is permutation[b * batch_size : (b + 1) * batch_size] (the last one may be smaller);
it is split into balanced contiguous shards, one per process, and each shard into at most
`grad_accum_steps` balanced micro-batches. The global batch never depends on the number of processes, so a
run resumes, or is compared, under any world size.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    """Dataset indices of one forward/backward; `weight` = its share of the global batch (n_micro / n_global),
    0 for a placeholder that only keeps a process without examples in step with the others."""

    indices: tuple[int, ...]
    weight: float
    last: bool


def permutation_seed(seed: int, epoch: int) -> int:
    return seed + epoch


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(permutation_seed(seed, epoch))
    return torch.randperm(num_examples, generator=generator).tolist()


def loader_seed(seed: int, epoch: int, batch_index: int) -> int:
    """Seed of the DataLoader's own generator (its worker seeds) for a loader starting at this position."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + batch_index


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def global_batch(permutation: Sequence[int], batch_size: int, index: int) -> list[int]:
    return list(permutation[index * batch_size:(index + 1) * batch_size])


def balanced_split(items: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` contiguous pieces whose sizes differ by at most one, larger ones first (numpy.array_split)."""
    size, extra = divmod(len(items), parts)
    pieces, start = [], 0
    for part in range(parts):
        stop = start + size + (1 if part < extra else 0)
        pieces.append(list(items[start:stop]))
        start = stop
    return pieces


def micro_batches(batch: Sequence[int], rank: int, world_size: int, accum_steps: int) -> list[MicroBatch]:
    """This process's micro-batches of global batch `batch` (never empty: see `MicroBatch.weight`)."""
    shard = balanced_split(batch, world_size)[rank]
    if not shard:
        return [MicroBatch((batch[0],), 0.0, True)]
    pieces = balanced_split(shard, min(accum_steps, len(shard)))
    return [MicroBatch(tuple(piece), len(piece) / len(batch), i == len(pieces) - 1) for i, piece in enumerate(pieces)]

"""Deterministic sample-size allocation and stratified sub-sampling, shared by the task builders and loaders.

Every random choice here takes an explicit seed and uses `random.Random`, whose shuffle has been stable across
Python 3 releases, so a split rebuilt later selects the same items.
"""
from __future__ import annotations

import random
from collections.abc import Hashable, Sequence


def balanced_counts(total: int, num_classes: int) -> list[int]:
    """Split `total` as evenly as possible over `num_classes`; the first `total % num_classes` classes get one more."""
    base, extra = divmod(total, num_classes)
    return [base + (1 if index < extra else 0) for index in range(num_classes)]


def proportional_counts(total: int, class_sizes: Sequence[int]) -> list[int]:
    """Split `total` in proportion to `class_sizes` (largest-remainder rounding, ties go to the earlier class)."""
    pool = sum(class_sizes)
    exact = [total * size / pool for size in class_sizes]
    counts = [int(share) for share in exact]
    by_remainder = sorted(range(len(exact)), key=lambda index: (-(exact[index] - counts[index]), index))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def group_by_label(labels: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Positions of each label, in first-seen label order and increasing position."""
    groups: dict[Hashable, list[int]] = {}
    for position, label in enumerate(labels):
        groups.setdefault(label, []).append(position)
    return groups


def stratified_subset(labels: Sequence[Hashable], size: int, seed: int) -> list[int]:
    """`size` positions drawn per label in proportion to the label counts, returned in increasing order."""
    groups = group_by_label(labels)
    keys = sorted(groups, key=lambda label: min(groups[label]))
    counts = proportional_counts(size, [len(groups[key]) for key in keys])
    rng = random.Random(seed)
    chosen: list[int] = []
    for key, count in zip(keys, counts):
        members = list(groups[key])
        rng.shuffle(members)
        chosen.extend(members[:count])
    return sorted(chosen)

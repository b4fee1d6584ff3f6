"""Allocation and stratified sub-sampling: exact totals, fair shares, determinism."""
from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from deltatune.data.sampling import balanced_counts, proportional_counts, stratified_subset


@given(st.integers(0, 10_000), st.integers(1, 50))
def test_balanced_counts_sum_to_total_and_differ_by_at_most_one(total, classes):
    counts = balanced_counts(total, classes)
    assert sum(counts) == total and len(counts) == classes
    assert max(counts) - min(counts) <= 1


@given(st.integers(0, 5_000), st.lists(st.integers(1, 3_000), min_size=1, max_size=20))
def test_proportional_counts_sum_to_total_within_one_of_the_exact_share(total, sizes):
    counts = proportional_counts(total, sizes)
    assert sum(counts) == total
    for count, size in zip(counts, sizes):
        assert abs(count - total * size / sum(sizes)) < 1


def test_stratified_subset_keeps_label_shares_and_depends_only_on_the_seed():
    labels = [0] * 600 + [1] * 300 + [2] * 100
    chosen = stratified_subset(labels, 100, seed=3)
    assert chosen == sorted(set(chosen)) and len(chosen) == 100
    assert Counter(labels[i] for i in chosen) == {0: 60, 1: 30, 2: 10}
    assert chosen == stratified_subset(labels, 100, seed=3)
    assert chosen != stratified_subset(labels, 100, seed=4)

"""The pure tensor functions of the delta algebra, against hand-computed values and float64 references."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.merging.algebra import ops
from deltatune.merging.algebra.statistics import key_to_float, order_statistics, sortable_keys


def test_task_vector_and_apply_round_trip():
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    tuned = torch.tensor([1.5, 1.0, 3.25], dtype=torch.float64)
    delta = ops.task_vector(tuned, base)
    assert delta.tolist() == [0.5, -1.0, 0.25]
    assert ops.apply_task_vector(base, delta).tolist() == tuned.tolist()
    assert ops.apply_task_vector(base, delta, 2.0).tolist() == [2.0, 0.0, 3.5]
    with pytest.raises(ValueError, match="shape"):
        ops.task_vector(tuned, base[:2])


def test_keep_count_matches_mergekit_rule():
    assert ops.keep_count(10, 0.3) == 3
    assert ops.keep_count(10, 0.01) == 1  # a positive density keeps at least one entry
    assert ops.keep_count(10, 0.0) == 0
    assert ops.keep_count(10, 1.0) == 10


def test_magnitude_keep_mask_hand_case():
    delta = torch.tensor([0.1, -0.5, 0.3, -0.05, 0.4])
    assert ops.magnitude_keep_mask(delta, 0.4).tolist() == [False, True, False, False, True]
    assert ops.magnitude_keep_mask(delta, 0.0).tolist() == [False] * 5
    assert ops.magnitude_keep_mask(delta, 1.0).tolist() == [True] * 5
    assert ops.magnitude_keep_mask(delta, 0.5, threshold=0.3).tolist() == [False, True, True, False, True]


def test_tie_breaks_at_the_cut_off():
    delta = torch.tensor([0.2, -0.2, 0.9, 0.2, 0.1])  # k = 2: 0.9, then one of the three 0.2s
    assert ops.magnitude_keep_mask(delta, 0.4, tie_break="all").tolist() == [True, True, True, True, False]
    assert ops.magnitude_keep_mask(delta, 0.4, tie_break="index").tolist() == [True, False, True, False, False]
    argsort_choice = torch.argsort(delta.abs(), descending=True)[:2]
    expected = torch.zeros(5, dtype=torch.bool)
    expected[argsort_choice] = True
    assert ops.magnitude_keep_mask(delta, 0.4, tie_break="argsort").tolist() == expected.tolist()
    with pytest.raises(ValueError, match="tie_break"):
        ops.magnitude_keep_mask(delta, 0.4, tie_break="random")


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_exact_k_tie_breaks_keep_exactly_k(numel, density, seed):
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randint(-4, 5, (numel,), generator=generator).float()  # many ties
    k = ops.keep_count(numel, density)
    for rule in ("index", "argsort"):
        mask = ops.magnitude_keep_mask(delta, density, tie_break=rule)
        assert int(mask.sum()) == k
        if 0 < k < numel:  # every kept magnitude >= every dropped one
            assert delta.abs()[mask].min() >= delta.abs()[~mask].max()


@pytest.mark.parametrize("numel", [3_000_000])
@pytest.mark.parametrize("k", [1, 2, 777, 1_500_000, 2_999_999, 3_000_000])
def test_kth_largest_large_tensors_equal_kthvalue(numel, k):
    generator = torch.Generator().manual_seed(k)
    values = torch.randn(numel, generator=generator).abs()
    values[::7] = values[3]  # plateaus do not fool the bracket
    assert ops.kth_largest(values, k) == torch.kthvalue(values, numel - k + 1).values


def test_kth_largest_falls_back_when_the_sample_misleads():
    values = torch.zeros(2_000_000)
    large = values[1::30_000]  # the sample takes every 30th entry from 0, so it never sees these
    large.copy_(torch.arange(1, large.numel() + 1).float())
    assert ops.kth_largest(values, 5) == torch.kthvalue(values, values.numel() - 4).values


def test_random_keep_mask_is_seeded_and_has_the_density():
    first = ops.random_keep_mask((400, 500), 0.3, torch.Generator().manual_seed(1))
    again = ops.random_keep_mask((400, 500), 0.3, torch.Generator().manual_seed(1))
    other = ops.random_keep_mask((400, 500), 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(first.float().mean().item() - 0.3) < 0.005  # 200k Bernoulli draws: std 0.001


def test_rescale_l1_matches_the_original_norm():
    original = torch.tensor([1.0, -2.0, 3.0, -4.0])
    masked = original * torch.tensor([1.0, 0.0, 0.0, 1.0])
    rescaled = ops.rescale_l1(masked, original)
    assert rescaled.abs().sum().item() == pytest.approx(10.0)
    assert rescaled.tolist() == pytest.approx([2.0, 0.0, 0.0, -8.0])
    assert torch.equal(ops.rescale_l1(torch.zeros(4), original), torch.zeros(4))


def test_elect_sign_sum_count_and_zero_rules():
    deltas = [torch.tensor([3.0, -2.0, 1.0, 0.0]), torch.tensor([-1.0, -4.0, -1.0, 0.0]),
              torch.tensor([-1.0, 1.0, -1.0, 0.0])]
    assert ops.elect_sign(deltas, "sum").tolist() == [1.0, -1.0, -1.0, 1.0]
    assert ops.elect_sign(deltas, "count").tolist() == [-1.0, -1.0, -1.0, 1.0]
    # the exactly-zero last entry takes the tensor's majority sign (-1: three of four entries)
    assert ops.elect_sign(deltas, "sum", zero="majority").tolist() == [1.0, -1.0, -1.0, -1.0]
    assert [d.tolist() for d in deltas][0] == [3.0, -2.0, 1.0, 0.0]  # inputs untouched


def test_disjoint_mean_hand_case():
    trimmed = [torch.tensor([3.0, -2.0, 0.0, 0.0]), torch.tensor([0.0, -4.0, 0.0, 5.0]),
               torch.tensor([2.0, 0.0, -3.0, 0.0])]
    sign = ops.elect_sign(trimmed)
    assert sign.tolist() == [1.0, -1.0, -1.0, 1.0]
    assert ops.disjoint_mean(trimmed, sign).tolist() == [2.5, -3.0, -3.0, 5.0]
    assert ops.disjoint_mean(trimmed, sign, [1.0, 1.0, 3.0]).tolist() == pytest.approx([9 / 4, -3.0, -3.0, 5.0])


def test_dare_drops_and_rescales():
    delta = torch.full((1000,), 2.0, dtype=torch.float64)
    pruned = ops.dare(delta, 0.9, torch.Generator().manual_seed(0))
    kept = pruned[pruned != 0]
    assert kept.numel() > 0 and torch.allclose(kept, torch.full_like(kept, 20.0))  # 2 / (1 - 0.9)
    assert ops.dare(delta, 0.9, torch.Generator().manual_seed(0), rescale=0.5).max() == 4.0  # DAREx-q divisor
    with pytest.raises(ValueError, match="drop_rate"):
        ops.dare(delta, 1.0, torch.Generator())


def test_dare_is_unbiased_in_expectation():
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(64, generator=generator, dtype=torch.float64)
    mean = sum(ops.dare(delta, 0.8, generator) for _ in range(4000)) / 4000
    # each entry: std of the estimate = |δ| sqrt(p / (1 - p)) / sqrt(4000) = 0.0316 |δ|
    assert torch.all((mean - delta).abs() <= 5 * 0.0317 * delta.abs() + 1e-12)


def test_quantile_clamp_and_min_max_follow_the_pcb_index_rule():
    values = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0, 100.0, 0.0, 6.0, 7.0, 8.0]])
    clamped, low, high = ops.quantile_clamp(values, 0.1, 0.1)
    # d = 10: low = sorted[1] = 1, high = sorted[int(10 * 0.9) - 1] = sorted[8] = 8
    assert low.item() == 1.0 and high.item() == 8.0
    assert clamped.tolist() == [[5.0, 1.0, 3.0, 2.0, 4.0, 8.0, 1.0, 6.0, 7.0, 8.0]]
    normalized = ops.rowwise_min_max(clamped)
    assert normalized[0, 0].item() == pytest.approx(4 / 7) and normalized.max() == 1 and normalized.min() == 0
    assert torch.equal(ops.rowwise_min_max(torch.ones(2, 3)), torch.zeros(2, 3))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=300))
def test_sortable_keys_order_like_the_floats(values):
    tensor = torch.tensor(values, dtype=torch.float32)
    keys = sortable_keys(tensor)
    order = torch.argsort(tensor, stable=True)
    assert torch.all(keys[order][1:] >= keys[order][:-1])
    assert all(key_to_float(int(k)) == v or (v == 0 and key_to_float(int(k)) == 0) for k, v in
               zip(keys.tolist(), tensor.tolist()))


def test_order_statistics_are_exact_over_groups():
    generator = torch.Generator().manual_seed(5)
    groups = [[torch.randn(n, generator=generator), torch.randn(n, generator=generator).abs()] for n in (7, 300, 50)]
    flat = [torch.cat([g[m] for g in groups]) for m in range(2)]
    ranks = [[1, 100, 357], [2, 3]]
    values = order_statistics(lambda: iter(groups), ranks)
    for model in range(2):
        ordered = torch.sort(flat[model], descending=True).values
        assert values[model] == tuple(float(ordered[r - 1]) for r in ranks[model])
    assert not math.isnan(values[0][0])


def test_elect_sign_sums_half_precision_in_float32_like_torch_sum():
    deltas = [torch.tensor([512.0], dtype=torch.bfloat16), torch.tensor([-1.0], dtype=torch.bfloat16),
              torch.tensor([-512.0], dtype=torch.bfloat16)]
    # bfloat16 step by step: 512 - 1 rounds to 512, then 0 → +1; the float32 total is -1 → -1
    assert ops.elect_sign(deltas).tolist() == [-1.0]
    assert torch.stack(deltas).sum(0).item() == -1.0

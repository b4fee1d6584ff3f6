"""Importance estimators against hand-computed values, and the proportional split's invariants."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.allocate.importance import (
    component_importance,
    delta_gradient_score,
    integrated_gradient_contribution,
    normalized_frobenius,
    path_contribution,
    proportional_ranks,
    sensitivity,
    sensitivity_score,
    slot_means,
    smooth_sensitivity,
)


def test_sensitivity_is_the_absolute_product():
    theta = torch.tensor([2.0, -3.0, 0.5])
    grad = torch.tensor([0.5, 1.0, -4.0])
    assert torch.equal(sensitivity(theta, grad), torch.tensor([1.0, 3.0, 2.0]))


def test_smoothing_uses_the_updated_average_for_the_uncertainty():
    # hand computation with beta1 = beta2 = 0.85, I = 2, previous Ī = 1, Ū = 0.5:
    # Ī' = 0.85·1 + 0.15·2 = 1.15;  Ū' = 0.85·0.5 + 0.15·|2 − 1.15| = 0.425 + 0.1275 = 0.5525
    average, uncertainty = smooth_sensitivity(*torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), 0.85, 0.85)
    assert average.item() == pytest.approx(1.15, abs=1e-12)
    assert uncertainty.item() == pytest.approx(0.5525, abs=1e-12)
    assert sensitivity_score(average, uncertainty).item() == pytest.approx(1.15 * 0.5525, abs=1e-12)


def test_component_importance_adds_the_mean_over_each_slice():
    # P (out=2 × r=3), λ (3 × 1), Q (3 × in=2): S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)
    p = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    lam = torch.tensor([[10.0], [20.0], [30.0]])
    q = torch.tensor([[1.0, 1.0], [0.0, 2.0], [4.0, 0.0]])
    scores = component_importance([(p, 1), (lam, 0), (q, 0)])
    assert torch.allclose(scores, torch.tensor([2.0 + 10.0 + 1.0, 3.0 + 20.0 + 1.0, 4.0 + 30.0 + 2.0]))


def test_slot_means_handles_convolution_shapes():
    kernel = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)  # (slots, in, kh, kw)
    assert torch.allclose(slot_means(kernel, 0), torch.tensor([5.5, 17.5], dtype=torch.float64))


def test_delta_gradient_score_by_hand():
    delta = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    grad = torch.tensor([[0.5, 0.5], [7.0, -1.0]])
    # (0.5 + 1 + 0 + 3) / sqrt(4) = 2.25
    assert delta_gradient_score(delta, grad).item() == pytest.approx(2.25)


def test_normalized_frobenius_by_hand():
    core = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    assert normalized_frobenius(core, 2).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="blocks"):
        normalized_frobenius(core, 0)


def test_path_contribution_sums_signed_products_then_takes_the_absolute_value():
    grads = [torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.0])]
    moves = [torch.tensor([-0.5, 0.5]), torch.tensor([-1.0, 3.0])]
    # (−0.5 − 0.5) + (−2 + 0) = −3 -> 3
    assert path_contribution(grads, moves).item() == pytest.approx(3.0)


def test_integrated_gradients_is_exact_for_a_quadratic_with_the_midpoint_rule():
    # L(θ) = Σ θ², path 0 -> e: ∫ ∇L · e dα = L(e) − L(0); the midpoint rule is exact for a linear gradient
    start, end = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    alphas = [(k + 0.5) / 4 for k in range(4)]
    gradients = [2 * (start + a * (end - start)) for a in alphas]
    assert integrated_gradient_contribution(start, end, gradients).item() == pytest.approx(6.0)


def test_proportional_ranks_by_hand():
    ranks = proportional_ranks({"a": 3.0, "b": 1.0, "c": 0.0}, total=9, minimum=1, maximum=dict.fromkeys("abc", 8))
    # extra 6 split 4.5 / 1.5 / 0 -> floors 4, 1, 0; one leftover to the larger remainder (tie -> name order)
    assert ranks == {"a": 6, "b": 2, "c": 1}


def test_proportional_ranks_respects_capacities_and_splits_zero_scores_equally():
    capped = proportional_ranks({"a": 100.0, "b": 1.0}, total=8, minimum=1, maximum={"a": 5, "b": 8})
    assert capped == {"a": 5, "b": 3}
    assert proportional_ranks({"a": 0.0, "b": 0.0}, 4, 1, {"a": 4, "b": 4}) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="cannot be split"):
        proportional_ranks({"a": 1.0}, 10, 1, {"a": 4})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=8), st.integers(1, 3), st.data())
def test_proportional_ranks_always_spends_the_exact_budget_within_bounds(scores, minimum, data):
    names = [f"m{i}" for i in range(len(scores))]
    maximum = {n: data.draw(st.integers(minimum, minimum + 10)) for n in names}
    total = data.draw(st.integers(minimum * len(names), sum(maximum.values())))
    ranks = proportional_ranks(dict(zip(names, scores)), total, minimum, maximum)
    assert sum(ranks.values()) == total
    assert all(minimum <= ranks[n] <= maximum[n] for n in names)
    # a strictly larger score never gets fewer units when neither is capped
    for x in names:
        for y in names:
            free = ranks[x] < maximum[x] and ranks[y] < maximum[y]
            if free and dict(zip(names, scores))[x] > dict(zip(names, scores))[y] + 1e-9:
                assert ranks[x] >= ranks[y] - 1


def test_estimators_do_not_track_gradients():
    theta = torch.randn(3, requires_grad=True)
    assert not sensitivity(theta, theta * 2).requires_grad
    assert not math.isnan(normalized_frobenius(theta.reshape(1, 3), 1).item())

"""Every registered merge method on hand-computed small cases, plus properties (hypothesis)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError, MergeError
from deltatune.merging import list_merge_methods, merge_state_dicts
from deltatune.merging.algebra.family import TaskModelParams
from deltatune.merging.methods.dare import DareModelParams, DareParams, DareTiesParams
from deltatune.merging.methods.darex import DarexModelParams, DarexParams
from deltatune.merging.methods.linear import LinearModelParams, LinearParams
from deltatune.merging.methods.magnitude_prune import MagnitudeModelParams, MagnitudePruneParams
from deltatune.merging.methods.task_arithmetic import TaskArithmeticParams
from deltatune.merging.methods.ties import TiesModelParams, TiesParams

F64 = torch.float64
MERGEKIT_TIES = TiesParams(sign_from="weighted", zero_sign="positive", trim_scope="tensor", tie_break="argsort")


def sd(values) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=F64)}


def deltas_to_models(base, deltas):
    return [sd([b + d for b, d in zip(base, delta)]) for delta in deltas]


def test_registry_lists_every_method_of_the_issue():
    names = {spec.name for spec in list_merge_methods()}
    assert {"task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "darex", "pcb",
            "linear"} <= names


def test_task_arithmetic_hand_case():
    base, models = sd([1.0, 2.0]), [sd([2.0, 0.0]), sd([1.0, 4.0])]
    weights = [TaskModelParams(weight=1.0), TaskModelParams(weight=2.0)]
    merged = merge_state_dicts("task_arithmetic", base, models, TaskArithmeticParams(scaling=0.5), weights)
    assert merged["w"].tolist() == [1.5, 3.0]  # 1 + 0.5*(1*1 + 2*0), 2 + 0.5*(1*-2 + 2*2)
    normalized = merge_state_dicts("task_arithmetic", base, models, TaskArithmeticParams(normalize=True), weights)
    assert normalized["w"].tolist() == pytest.approx([1 + 1 / 3, 2 + 2 / 3])


def test_task_arithmetic_negation_forgets():
    base, tuned = sd([0.0, 1.0]), sd([1.0, 3.0])
    forgot = merge_state_dicts("task_arithmetic", base, [tuned], TaskArithmeticParams(scaling=0.5),
                               [TaskModelParams(weight=-1.0)])
    assert forgot["w"].tolist() == [-0.5, 0.0]


TIES_BASE = [10.0, 10.0, 10.0, 10.0]
TIES_DELTAS = [[3.0, -2.0, 1.0, 0.0], [-1.0, -4.0, 2.0, 5.0], [2.0, 1.0, -3.0, -1.0]]


def test_ties_paper_hand_case():
    # trim to 2 of 4: [3,-2,0,0], [0,-4,0,5], [2,0,-3,0]; elect [+,-,-,+]; disjoint mean [2.5,-3,-3,5]
    models = deltas_to_models(TIES_BASE, TIES_DELTAS)
    params = TiesParams(trim_scope="tensor")
    merged = merge_state_dicts("ties", sd(TIES_BASE), models, params, [TiesModelParams(density=0.5)] * 3)
    assert merged["w"].tolist() == [12.5, 7.0, 7.0, 15.0]
    scaled = merge_state_dicts("ties", sd(TIES_BASE), models, TiesParams(trim_scope="tensor", scaling=2.0),
                               [TiesModelParams(density=0.5)] * 3)
    assert scaled["w"].tolist() == [15.0, 4.0, 4.0, 20.0]


def test_ties_weighted_election_differs_from_the_paper_order():
    base = [0.0]
    models = deltas_to_models(base, [[3.0], [-2.0]])
    weights = [TiesModelParams(weight=1.0, density=1.0), TiesModelParams(weight=2.0, density=1.0)]
    paper = merge_state_dicts("ties", sd(base), models, TiesParams(trim_scope="tensor"), weights)
    mergekit = merge_state_dicts("ties", sd(base), models, MERGEKIT_TIES, weights)
    assert paper["w"].tolist() == [3.0]  # unweighted sum +1 → only model 0 agrees: 1*3 / 1
    assert mergekit["w"].tolist() == [-2.0]  # weighted sum 3 - 4 < 0 → only model 1: 2*(-2) / 2


def test_ties_trim_scope_model_uses_one_cut_off_for_the_whole_model():
    base = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    tuned = {"a": torch.tensor([5.0, 4.0], dtype=F64), "b": torch.tensor([1.0, 0.5], dtype=F64)}
    models = [TiesModelParams(density=0.5)]
    per_model = merge_state_dicts("ties", base, [tuned], TiesParams(trim_scope="model"), models)
    per_tensor = merge_state_dicts("ties", base, [tuned], TiesParams(trim_scope="tensor"), models)
    assert per_model["a"].tolist() == [5.0, 4.0] and per_model["b"].tolist() == [0.0, 0.0]
    assert per_tensor["a"].tolist() == [5.0, 0.0] and per_tensor["b"].tolist() == [1.0, 0.0]


def test_magnitude_prune_hand_case():
    base, models = sd([0.0] * 4), [sd([0.1, -0.5, 0.3, -0.05]), sd([0.2, 0.2, -1.0, 0.0])]
    merged = merge_state_dicts("magnitude_prune", base, models, MagnitudePruneParams(),
                               [MagnitudeModelParams(density=0.5), MagnitudeModelParams(weight=0.5, density=0.25)])
    assert merged["w"].tolist() == pytest.approx([0.0, -0.5, 0.3 - 0.5, 0.0])


def test_dare_linear_density_one_is_task_arithmetic_and_dropping_is_seeded():
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50, 40, generator=generator, dtype=F64)}
    models = [{"w": base["w"] + torch.randn(50, 40, generator=generator, dtype=F64)} for _ in range(2)]
    full = [DareModelParams(density=1.0, weight=w) for w in (0.3, 0.7)]
    dare = merge_state_dicts("dare_linear", base, models, DareParams(), full)
    ta = merge_state_dicts("task_arithmetic", base, models, None, [TaskModelParams(weight=w) for w in (0.3, 0.7)])
    torch.testing.assert_close(dare["w"], ta["w"])
    sparse = [DareModelParams(density=0.25)] * 2
    first = merge_state_dicts("dare_linear", base, models, DareParams(), sparse, seed=1)
    again = merge_state_dicts("dare_linear", base, models, DareParams(), sparse, seed=1)
    other = merge_state_dicts("dare_linear", base, models, DareParams(), sparse, seed=2)
    assert torch.equal(first["w"], again["w"]) and not torch.equal(first["w"], other["w"])
    delta = first["w"] - base["w"]
    kept = [(m["w"] - base["w"]) / 0.25 for m in models]  # a surviving entry is δ / (1 - p)
    candidates = torch.stack([torch.zeros_like(delta), kept[0], kept[1], kept[0] + kept[1]])
    assert torch.all(torch.isclose(candidates, delta.unsqueeze(0)).any(dim=0))


def test_dare_rescale_variants():
    base, models = sd([0.0] * 4000), [sd([1.0] * 4000)]
    density = [DareModelParams(density=0.2)]
    paper = merge_state_dicts("dare_linear", base, models, DareParams(), density)["w"]
    drop_only = merge_state_dicts("dare_linear", base, models, DareParams(rescale="none"), density)["w"]
    l1 = merge_state_dicts("dare_linear", base, models, DareParams(rescale="l1"), density)["w"]
    assert paper.unique().tolist() == pytest.approx([0.0, 5.0])
    assert drop_only.unique().tolist() == [0.0, 1.0]
    assert DareParams(rescale=True).rescale == "inverse_density" and DareParams(rescale=False).rescale == "none"
    assert l1.sum().item() == pytest.approx(4000.0)  # the L1 norm of the delta is restored exactly


def test_dare_ties_elects_signs_after_dropping():
    base = sd([0.0] * 3)
    models = [sd([1.0, -1.0, 2.0]), sd([-3.0, -1.0, 2.0])]
    full = [DareModelParams(density=1.0)] * 2
    merged = merge_state_dicts("dare_ties", base, models, DareTiesParams(normalize=True), full)
    assert merged["w"].tolist() == [-3.0, -1.0, 2.0]


@pytest.mark.parametrize("method, params, model_params", [
    ("ties", TiesParams(normalize="count"), TiesModelParams),
    ("dare_ties", DareTiesParams(normalize="count"), DareModelParams),
])
def test_count_normalization_divides_the_weighted_agreeing_sum_by_the_agreeing_models(method, params,
                                                                                      model_params):
    """peft's weighted TIES: Σ_{i∈A} w_i δ_i / |A|, the sign elected from the unweighted trimmed deltas."""
    base = sd([0.0] * 3)
    models = [sd([1.0, -1.0, 2.0]), sd([3.0, 2.0, 4.0])]
    weights = [model_params(weight=2.0, density=1.0), model_params(weight=0.5, density=1.0)]
    merged = merge_state_dicts(method, base, models, params, weights)["w"].tolist()
    # entry 0: both agree (+) -> (2·1 + 0.5·3) / 2; entry 1: unweighted sum +1 -> only model 2 agrees -> 0.5·2 / 1
    assert merged == pytest.approx([1.75, 1.0, (2 * 2 + 0.5 * 4) / 2])
    with pytest.raises(ConfigError, match="normalize='mean'"):
        type(params)(normalize="mean")


def test_darex_divides_by_q():
    base, models = sd([0.0] * 2000), [sd([1.0] * 2000)]
    merged = merge_state_dicts("darex", base, models, DarexParams(), [DarexModelParams(density=0.1, q=0.4)])
    assert merged["w"].unique().tolist() == [0.0, 2.5]
    dare = merge_state_dicts("darex", base, models, DarexParams(), [DarexModelParams(density=0.1)])
    assert dare["w"].unique().tolist() == pytest.approx([0.0, 10.0])  # q unset: 1/(1-p)
    with pytest.raises(ConfigError, match="q=1.5"):
        DarexModelParams(q=1.5)


def test_linear_soup_and_weight_rules():
    models = [sd([1.0, 2.0]), sd([3.0, 6.0])]
    merged = merge_state_dicts("linear", None, models, LinearParams(),
                               [LinearModelParams(weight=1.0), LinearModelParams(weight=3.0)])
    assert merged["w"].tolist() == [2.5, 5.0]
    affine = merge_state_dicts("linear", None, models, LinearParams(normalize=False),
                               [LinearModelParams(weight=0.25), LinearModelParams(weight=0.75)])
    assert affine["w"].tolist() == [2.5, 5.0]
    with pytest.raises(MergeError, match="sum to 1"):
        merge_state_dicts("linear", None, models, LinearParams(normalize=False), [LinearModelParams()] * 2)
    with pytest.raises(MergeError, match="sum to 0"):
        merge_state_dicts("linear", None, models, None, [LinearModelParams(1.0), LinearModelParams(-1.0)])


@pytest.mark.parametrize("make", [
    lambda: TaskModelParams(density=1.5), lambda: TiesParams(sign_from="both"), lambda: TiesParams(trim_scope="x"),
    lambda: DareParams(rescale="sometimes"), lambda: TiesParams(sign_election="vote"),
])
def test_params_are_validated_with_the_field_name(make):
    with pytest.raises(ConfigError, match="invalid: expected"):
        make()


floats = st.floats(-2.0, 2.0, allow_nan=False, width=64)


@settings(max_examples=30, deadline=None)
@given(st.lists(floats, min_size=1, max_size=12), st.lists(floats, min_size=1, max_size=12), st.integers(1, 4))
def test_merging_a_model_with_itself_gives_it_back(base_values, delta_values, copies):
    size = min(len(base_values), len(delta_values))
    base = sd(base_values[:size])
    tuned = sd([b + d for b, d in zip(base_values[:size], delta_values[:size])])
    for method, params, model in [
        ("task_arithmetic", TaskArithmeticParams(normalize=True), TaskModelParams()),
        ("ties", TiesParams(trim_scope="tensor"), TiesModelParams(density=1.0)),
        ("ties", MERGEKIT_TIES, TiesModelParams(density=1.0, weight=0.7)),
        ("dare_linear", DareParams(normalize=True), DareModelParams(density=1.0)),
        ("linear", LinearParams(), LinearModelParams()),
    ]:
        merged = merge_state_dicts(method, None if method == "linear" else base, [tuned] * copies, params,
                                   [model] * copies)
        torch.testing.assert_close(merged["w"], tuned["w"], msg=method)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.integers(0, 10_000))
def test_ties_at_density_one_without_sign_conflicts_is_the_mean_of_task_vectors(count, size, seed):
    generator = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(size, generator=generator, dtype=F64)}
    signs = torch.randn(size, generator=generator, dtype=F64).sign()
    deltas = [torch.rand(size, generator=generator, dtype=F64) * signs for _ in range(count)]
    models = [{"w": base["w"] + d} for d in deltas]
    merged = merge_state_dicts("ties", base, models, TiesParams(trim_scope="tensor"),
                               [TiesModelParams(density=1.0)] * count)
    torch.testing.assert_close(merged["w"], base["w"] + sum(deltas) / count)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-3, 3, allow_nan=False, width=64), min_size=2, max_size=2), st.floats(0.1, 3))
def test_task_arithmetic_is_linear_in_weights_and_scaling(weights, scaling):
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, generator=generator, dtype=F64)}
    models = [{"w": base["w"] + torch.randn(6, generator=generator, dtype=F64)} for _ in range(2)]
    merged = merge_state_dicts("task_arithmetic", base, models, TaskArithmeticParams(scaling=scaling),
                               [TaskModelParams(weight=w) for w in weights])
    expected = base["w"] + scaling * sum(w * (m["w"] - base["w"]) for w, m in zip(weights, models))
    torch.testing.assert_close(merged["w"], expected)


def test_dare_linear_merge_is_unbiased_over_seeds():
    generator = torch.Generator().manual_seed(4)
    base = {"w": torch.zeros(32, dtype=F64)}
    models = [{"w": torch.randn(32, generator=generator, dtype=F64)} for _ in range(2)]
    params = [DareModelParams(density=0.5)] * 2
    mean = sum(merge_state_dicts("dare_linear", base, models, DareParams(), params, seed=s)["w"]
               for s in range(2000)) / 2000
    target = models[0]["w"] + models[1]["w"]
    spread = (models[0]["w"].square() + models[1]["w"].square()).sqrt() / 2000 ** 0.5  # std of the mean
    assert torch.all((mean - target).abs() <= 5 * spread + 1e-12)


@pytest.mark.parametrize("method,params", [("magnitude_prune", MagnitudePruneParams(rescale="l1")),
                                           ("dare_linear", DareParams(rescale="l1"))])
def test_l1_rescale_of_a_float16_delta_beyond_the_float16_range_stays_finite(method, params):
    # Σ|δ| = 2e5 > 65,504: summed in float16 it was ∞, and the rescale ∞ / ∞ made every kept entry NaN
    base, tuned = {"w": torch.zeros(200_000, dtype=torch.float16)}, {"w": torch.ones(200_000, dtype=torch.float16)}
    merged = merge_state_dicts(method, base, [tuned], params, [TaskModelParams(density=0.5)])["w"]
    assert torch.isfinite(merged).all()
    assert float(merged.float().sum()) == pytest.approx(200_000, rel=1e-3)  # L1 norm kept, as the rule says

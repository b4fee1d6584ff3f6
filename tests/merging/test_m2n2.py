"""M2N2: resource competition, attraction, split-point crossover, the archive and the loop, against hand-computed
values and a float64 transcription of the official element-wise formula (SakanaAI/natural_niches)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError, MergeError
from deltatune.merging.search import m2n2
from deltatune.merging.search.m2n2 import M2N2Config

# 3 members x 3 data points; z = [2, 1, 2]
SCORES = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])


def test_shared_fitness_hand_case():
    # alpha = 1: rewards [[.5, 1, 0], [.5, 0, .5], [0, 0, .5]]
    assert m2n2.shared_rewards(SCORES).tolist() == [[0.5, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 0.5]]
    assert m2n2.shared_fitness(SCORES).tolist() == [1.5, 1.0, 0.5]
    # alpha = 0 is the plain GA fitness (raw counts); alpha = 2 divides by z^2
    assert m2n2.shared_fitness(SCORES, alpha=0.0).tolist() == [2.0, 2.0, 1.0]
    assert m2n2.shared_fitness(SCORES, alpha=2.0).tolist() == [1.25, 0.5, 0.25]


def test_data_point_nobody_solves_counts_as_one_and_bool_scores_work():
    scores = torch.tensor([[True, False], [True, False]])
    assert m2n2.shared_fitness(scores).tolist() == [0.5, 0.5]
    graded = torch.tensor([[0.5, 0.0], [1.5, 0.0]])  # non-binary scores share in proportion
    assert m2n2.shared_rewards(graded).tolist() == [[0.25, 0.0], [0.75, 0.0]]


def test_attraction_hand_case():
    assert m2n2.attraction(SCORES, 0).tolist() == [0.0, 0.5, 0.5]
    assert m2n2.attraction(SCORES, 2).tolist() == [1.5, 0.5, 0.0]
    assert m2n2.attraction(SCORES, 1).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(MergeError, match="out of range"):
        m2n2.attraction(SCORES, 3)


def test_worst_member_hand_case_and_ties():
    # with child [0, 1, 1]: z = [2, 2, 3]; fitness = [1, 5/6, 1/3, 5/6] -> member 2 leaves
    assert m2n2.worst_member(SCORES, torch.tensor([0.0, 1.0, 1.0])) == 2
    assert m2n2.worst_member(SCORES, torch.tensor([0.0, 0.0, 0.0])) == 3  # the child itself loses
    # a child as good as the worst member: the old member (lower index) leaves, like jnp.argmin
    assert m2n2.worst_member(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.0, 1.0])) == 1
    with pytest.raises(MergeError, match="one score per data point"):
        m2n2.worst_member(SCORES, torch.tensor([1.0, 0.0]))


def test_sample_parents_follow_fitness_and_attraction():
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # fitness [.5, .5, 1]; only 2 helps 0 and 1
    generator = torch.Generator().manual_seed(0)
    draws = [m2n2.sample_parents(scores, generator) for _ in range(3000)]
    firsts = torch.bincount(torch.tensor([a for a, _ in draws]), minlength=3).double() / len(draws)
    assert torch.allclose(firsts, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64), atol=0.04)
    assert all(b == 2 for a, b in draws if a in (0, 1))
    assert all(b in (0, 1) for a, b in draws if a == 2)


def test_sample_parents_fallbacks_when_probabilities_vanish():
    generator = torch.Generator().manual_seed(1)
    # nobody is attractive to a single member: B falls back to fitness sampling (itself)
    assert m2n2.sample_parents(torch.tensor([[1.0, 1.0]]), generator) == (0, 0)
    # all fitness zero: uniform, still valid indices
    pairs = {m2n2.sample_parents(torch.zeros(3, 4), generator) for _ in range(50)}
    assert all(0 <= a < 3 and 0 <= b < 3 for a, b in pairs) and len(pairs) > 1


def official_split_slerp(mix: float, split: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """helper_fn.slerp_w_splitpoint transcribed element-wise in float64 (the reference)."""
    # float64 weights: torch.tensor(mix) alone is float32, which put the reference ~1e-7 away from exact
    val = torch.where(torch.arange(x.numel()) < split, torch.tensor(mix, dtype=torch.float64),
                      torch.tensor(1.0 - mix, dtype=torch.float64))
    x, y = x.double(), y.double()
    dot = (x / x.norm()) @ (y / y.norm())
    omega = torch.arccos(dot.clamp(-1, 1))
    sin_omega = torch.sin(omega)
    if sin_omega > 1e-6:
        return torch.sin((1 - val) * omega) / sin_omega * x + torch.sin(val * omega) / sin_omega * y
    return (1 - val) * x + val * y


def test_split_point_crossover_hand_case_exact_boundaries():
    first = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    second = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # orthogonal: omega = pi/2, sin = 1
    child = m2n2.split_point_crossover(first, second, 0.25, 2)
    big, small = math.sin(3 * math.pi / 8), math.sin(math.pi / 8)
    assert torch.allclose(child, torch.tensor([big, small, small, big], dtype=torch.float64), atol=1e-15)
    # split 0: every entry uses 1 - mix; split D: every entry uses mix
    assert torch.allclose(m2n2.split_point_crossover(first, second, 0.25, 0), m2n2.slerp(first, second, 0.75))
    assert torch.allclose(m2n2.split_point_crossover(first, second, 0.25, 4), m2n2.slerp(first, second, 0.25))
    assert m2n2.slerp(first, second, 0.0).tolist() == first.tolist()


def test_parallel_parents_fall_back_to_lerp():
    first = torch.tensor([1.0, 2.0], dtype=torch.float64)
    second = 2 * first
    child = m2n2.split_point_crossover(first, second, 0.25, 1)
    assert torch.allclose(child, torch.tensor([1.25, 3.5], dtype=torch.float64), atol=1e-12)
    zero = torch.zeros(2, dtype=torch.float64)
    assert m2n2.slerp(zero, second, 0.5).tolist() == [1.0, 2.0]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.floats(0.0, 1.0), st.data())
def test_split_point_crossover_matches_official_formula(length, mix, data):
    split = data.draw(st.integers(0, length))
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(length, generator=generator, dtype=torch.float64)
    second = torch.randn(length, generator=generator, dtype=torch.float64)
    expected = official_split_slerp(mix, split, first, second)
    assert torch.allclose(m2n2.split_point_crossover(first, second, mix, split), expected, atol=1e-10)


def test_crossover_and_mutation_are_seeded_and_leave_inputs_alone():
    first, second = torch.randn(50), torch.randn(50)
    copies = first.clone(), second.clone()
    children = [m2n2.random_crossover(first, second, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(children[0], children[1])
    mutants = [m2n2.mutate(first, 0.01, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(mutants[0], mutants[1]) and not torch.equal(mutants[0], first)
    assert 0.005 < float((mutants[0] - first).std()) < 0.02
    assert torch.equal(m2n2.mutate(first, 0.0, torch.Generator()), first)
    assert torch.equal(first, copies[0]) and torch.equal(second, copies[1])


def test_crossover_rejects_mismatched_parents():
    with pytest.raises(MergeError, match="same length"):
        m2n2.split_point_crossover(torch.zeros(3), torch.zeros(4), 0.5, 1)
    with pytest.raises(MergeError, match="split=5 is out of range"):
        m2n2.split_point_crossover(torch.ones(3), torch.ones(3), 0.5, 5)


def test_archive_fills_then_evicts_the_worst():
    archive = m2n2.Archive.empty(2, torch.zeros(3), data_points=2)
    assert archive.offer(torch.ones(3), torch.tensor([1.0, 0.0]), 1.0) == 0
    assert archive.offer(2 * torch.ones(3), torch.tensor([1.0, 0.0]), 1.0) == 1
    # a specialist on the uncontested point 1 replaces a redundant member (fitness .5 each vs 1)
    assert archive.offer(3 * torch.ones(3), torch.tensor([0.0, 1.0]), 1.0) == 0
    assert archive.members[:, 0].tolist() == [3.0, 2.0]
    assert archive.offer(4 * torch.ones(3), torch.tensor([0.0, 0.0]), 1.0) is None  # a useless child loses


class ThresholdTask:
    """A tiny real search problem: classify 64 random points by the sign of a hidden linear function."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(64, 5, generator=generator)
        self.labels = self.inputs @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0]) > 0
        self.calls = 0

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return ((self.inputs @ params > 0) == self.labels).float()


def run_small(seed: int, **overrides) -> m2n2.M2N2Result:
    task = ThresholdTask()
    generator = torch.Generator().manual_seed(10)
    seeds = [torch.randn(5, generator=generator) for _ in range(2)]
    config = M2N2Config(population_size=6, total_evaluations=150, mutation_std=0.1, **overrides)
    result = m2n2.evolve(seeds, task, config, seed=seed, progress=False)
    assert task.calls == result.evaluations == 152
    return result


def test_evolve_is_seeded_and_improves():
    first, again, other = run_small(0), run_small(0), run_small(1)
    assert torch.equal(first.archive.params, again.archive.params) and first.history == again.history
    assert not torch.equal(first.archive.params, other.archive.params)
    assert first.history[-1] > first.history[0] + 0.1 and first.history[-1] > 0.8
    assert first.archive.size == 6
    assert float(first.best_scores.mean()) == max(first.history)


@pytest.mark.parametrize("overrides", [{"use_attraction": False}, {"use_split_point": False},
                                       {"use_crossover": False}, {"alpha": 0.0}])
def test_ablations_run(overrides):
    assert run_small(0, **overrides).history[-1] > 0.5


def test_evolve_bad_input():
    def task(params):
        return (params > 0).float()

    with pytest.raises(MergeError, match="population is empty"):
        m2n2.evolve([], task, progress=False)
    with pytest.raises(MergeError, match="one common length"):
        m2n2.evolve([torch.zeros(3), torch.zeros(4)], task, progress=False)
    with pytest.raises(MergeError, match="flat vector of 3"):
        m2n2.evolve([torch.zeros(3), torch.zeros(3)], lambda p: torch.zeros(3 if p.sum() == 0 else 2),
                    M2N2Config(total_evaluations=2, mutation_std=0.1), progress=False)
    with pytest.raises(MergeError, match="negative"):
        m2n2.evolve([torch.zeros(3)], lambda p: -torch.ones(3), progress=False)
    with pytest.raises(MergeError, match="non-empty"):
        m2n2.shared_fitness(torch.zeros(0, 3))


@pytest.mark.parametrize("field, value", [("population_size", 1), ("alpha", -1.0), ("total_evaluations", -5),
                                          ("mutation_std", float("nan")), ("use_attraction", "yes")])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        M2N2Config(**{field: value})


def test_config_defaults_are_the_official_ones():
    config = M2N2Config()
    assert (config.population_size, config.alpha, config.total_evaluations, config.mutation_std) == \
        (20, 1.0, 50_000, 0.01)
    assert config.use_crossover and config.use_split_point and config.use_attraction

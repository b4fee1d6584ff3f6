"""M2N2 — Model Merging of Natural Niches (Abrantes, Lange, Tang, "Competition and Attraction Improve Model
Fusion", GECCO 2025; official JAX code: SakanaAI/natural_niches).

An evolutionary loop over an archive of flat parameter vectors. Each step:

1. **Resource competition** (paper §3.2): every data point j is a resource of capacity 1 shared by the archive,
   z_j = Σ_k s(x_j | θ_k); a member's fitness is f(θ_i) = Σ_j s(x_j | θ_i) / z_j^α (z_j = 0 counts as 1, α = 1).
   With α = 0 this is the plain GA fitness (the official `--method ga`).
2. **Attraction** (paper §3.3): parent A ~ f / Σf; parent B ~ g(A, ·) / Σg with
   g(A, B) = Σ_j max(0, s(x_j|B)/z_j^α − s(x_j|A)/z_j^α): B is attractive where it is strong and A is weak.
3. **Dynamic merging boundary** (paper §3.1): split index k ~ U{0..D−1}, mixing ratio w ~ U(0, 1); the child is
   SLERP(A, B, w) on entries [0, k) and SLERP(A, B, 1 − w) on [k, D), with the angle Ω of the *whole* vectors
   (as the official `helper_fn.slerp_w_splitpoint` does), falling back to lerp when sin Ω ≤ 1e-6.
4. **Mutation** (from scratch only): + N(0, 0.01²) on every entry.
5. **Archive update**: the child joins; among the P + 1 the lowest shared fitness (z over all P + 1) leaves,
   which may be the child itself.

Defaults follow the official code (`main.py`, `natural_niches_fn.py`, `helper_fn.py`): population 20, α = 1,
attraction, split point and crossover on, mutation std 0.01 (the from-scratch default; the official
`--use_pre_trained` runs use none: pass `mutation_std=0` when merging trained models), 50,000 evaluations.

Deviations from the official code (all in degenerate cases the official code turns into NaN probabilities):
- if every member has zero fitness, parent A is drawn uniformly from the members;
- if no member is attractive to A (g = 0 everywhere, e.g. A dominates or the archive has one member), B is
  drawn from the fitness distribution like A (possibly A itself, which then crossovers to A);
- a zero-norm parent makes Ω undefined; we use lerp there;
- the archive grows until full instead of starting with all-zero placeholder slots; the official placeholders
  have zero fitness and are always replaced first, so the two agree except when a child of zero fitness meets
  an occupied member of zero fitness.
Per-example scores may be any finite non-negative numbers (the paper allows s ∈ [0, c_j]; the code uses 0/1).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from deltatune.errors import MergeError, config_check

SIN_OMEGA_THRESHOLD = 1e-6  # helper_fn.slerp: below this sin Ω the official code switches to lerp


@dataclass(frozen=True)
class M2N2Config:
    """Hyper-parameters of M2N2; defaults are the official code's from-scratch run (see the module docstring)."""

    population_size: int = 20
    alpha: float = 1.0
    total_evaluations: int = 50_000
    mutation_std: float = 0.01
    use_crossover: bool = True
    use_split_point: bool = True
    use_attraction: bool = True

    def __post_init__(self) -> None:
        config_check(isinstance(self.population_size, int) and self.population_size >= 2, "population_size",
                     self.population_size, "an integer >= 2", "the official default is 20")
        config_check(isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 10.0, "alpha", self.alpha,
                     "a number in [0, 10]", "1 is M2N2's competition, 0 the plain GA fitness")
        config_check(isinstance(self.total_evaluations, int) and self.total_evaluations >= 0,
                     "total_evaluations", self.total_evaluations, "an integer >= 0 (children to evaluate)",
                     "the official default is 50000")
        config_check(isinstance(self.mutation_std, (int, float)) and math.isfinite(self.mutation_std)
                     and self.mutation_std >= 0.0, "mutation_std", self.mutation_std, "a finite number >= 0",
                     "use 0.01 from scratch and 0 when merging trained models")
        for name in ("use_crossover", "use_split_point", "use_attraction"):
            value = getattr(self, name)
            config_check(isinstance(value, bool), name, value, "True or False")


# ---------------------------------------------------------------------------------------------------------
# Resource competition and attraction (pure functions on a (members, data points) score matrix)
# ---------------------------------------------------------------------------------------------------------

def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise MergeError(f"scores of shape {tuple(scores.shape)} are invalid: expected a non-empty (members, "
                         "data points) matrix; evaluate at least one member on at least one data point")
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise MergeError("scores contain NaN or infinity: expected finite per-example scores; check the "
                         "evaluation function")
    if bool((scores < 0).any()):
        raise MergeError("scores contain negative values: expected per-example scores >= 0 (e.g. 1 = correct, "
                         "0 = wrong); shift or clip the evaluation's scores")


def _rewards(scores: Tensor, alpha: float) -> Tensor:
    totals = scores.sum(dim=0)
    totals = torch.where(totals == 0, torch.ones_like(totals), totals)
    return scores / totals.pow(alpha)


def shared_rewards(scores: Tensor, alpha: float = 1.0) -> Tensor:
    """s(x_j|θ_i) / z_j^α with z_j = Σ_k s(x_j|θ_k) (z_j = 0 → 1): each data point's reward shared (§3.2)."""
    _check_scores(scores)
    return _rewards(scores.to(torch.float64), alpha)


def shared_fitness(scores: Tensor, alpha: float = 1.0) -> Tensor:
    """Fitness of each member under resource competition: f(θ_i) = Σ_j s(x_j|θ_i) / z_j^α (float64)."""
    return shared_rewards(scores, alpha).sum(dim=1)


def _attraction(rewards: Tensor, first: int) -> Tensor:
    return (rewards - rewards[first]).clamp_min(0.0).sum(dim=1)


def attraction(scores: Tensor, first: int, alpha: float = 1.0) -> Tensor:
    """g(A, B) for every member B: Σ_j max(0, shared reward of B on j − that of A on j) (§3.3); g(A, A) = 0."""
    rewards = shared_rewards(scores, alpha)
    _check_member_index(first, rewards.shape[0])
    return _attraction(rewards, first)


def _check_member_index(index: int, members: int) -> None:
    if not 0 <= index < members:
        raise MergeError(f"member index {index} is out of range: expected 0..{members - 1}")


def _draw(weights: Tensor, generator: torch.Generator) -> int:
    """One index drawn with probability proportional to `weights` (uniform when they are all zero)."""
    if float(weights.sum()) <= 0.0:
        weights = torch.ones_like(weights)
    sample = torch.multinomial(weights.to(device=generator.device, dtype=torch.float64), 1, generator=generator)
    return int(sample.item())


def _sample_parents(rewards: Tensor, generator: torch.Generator, use_attraction: bool) -> tuple[int, int]:
    fitness = rewards.sum(dim=1)
    first = _draw(fitness, generator)
    if not use_attraction:
        return first, _draw(fitness, generator)
    attractiveness = _attraction(rewards, first)
    if float(attractiveness.sum()) <= 0.0:
        return first, _draw(fitness, generator)  # no partner helps A: the official code gives NaN here
    return first, _draw(attractiveness, generator)


def sample_parents(scores: Tensor, generator: torch.Generator, alpha: float = 1.0,
                   use_attraction: bool = True) -> tuple[int, int]:
    """Indices (A, B): A by shared fitness; B by attraction to A, or by shared fitness too without attraction."""
    return _sample_parents(shared_rewards(scores, alpha), generator, use_attraction)


def _worst_member(scores: Tensor, child_scores: Tensor, alpha: float) -> int:
    extended = torch.cat([scores, child_scores[None]], dim=0)
    return int(torch.argmin(_rewards(extended, alpha).sum(dim=1)).item())


def worst_member(scores: Tensor, child_scores: Tensor, alpha: float = 1.0) -> int:
    """Index among the P members and the child (index P) with the lowest shared fitness over all P + 1.

    Ties go to the lowest index (like jnp.argmin), so an old member leaves before an equally bad child.
    """
    if child_scores.dim() != 1 or scores.dim() != 2 or child_scores.shape[0] != scores.shape[1]:
        raise MergeError(f"child scores of shape {tuple(child_scores.shape)} do not fit the archive scores "
                         f"{tuple(scores.shape)}: expected one score per data point")
    _check_scores(scores)
    _check_scores(child_scores[None])
    return _worst_member(scores.to(torch.float64), child_scores.to(torch.float64), alpha)


# ---------------------------------------------------------------------------------------------------------
# Crossover and mutation (pure functions on flat parameter vectors)
# ---------------------------------------------------------------------------------------------------------

def _check_pair(first: Tensor, second: Tensor) -> None:
    if first.dim() != 1 or second.dim() != 1 or first.shape != second.shape or first.numel() == 0:
        raise MergeError(f"parents of shapes {tuple(first.shape)} and {tuple(second.shape)} cannot be merged: "
                         "expected two non-empty flat vectors of the same length; flatten the models with "
                         "torch.nn.utils.parameters_to_vector")


def slerp_coefficients(first: Tensor, second: Tensor, weight: float) -> tuple[float, float]:
    """(c_A, c_B) with SLERP(A, B, t) = c_A·A + c_B·B, Ω from the whole vectors; lerp when sin Ω ≤ 1e-6."""
    norms = first.double().norm() * second.double().norm()
    if float(norms) == 0.0:
        return 1.0 - weight, weight
    cosine = float((first.double() @ second.double()) / norms)
    omega = math.acos(min(1.0, max(-1.0, cosine)))
    sin_omega = math.sin(omega)
    if sin_omega <= SIN_OMEGA_THRESHOLD:
        return 1.0 - weight, weight
    return math.sin((1.0 - weight) * omega) / sin_omega, math.sin(weight * omega) / sin_omega


def slerp(first: Tensor, second: Tensor, weight: float) -> Tensor:
    """Spherical interpolation of two flat vectors (weight 0 → first, 1 → second)."""
    _check_pair(first, second)
    coefficient_a, coefficient_b = slerp_coefficients(first, second, weight)
    return coefficient_a * first + coefficient_b * second


def split_point_crossover(first: Tensor, second: Tensor, mix: float, split: int) -> Tensor:
    """The M2N2 child: SLERP with weight `mix` on entries [0, split), with 1 − mix on [split, D) (§3.1).

    Both segments use the angle of the whole vectors, as the official code does.
    """
    _check_pair(first, second)
    if not 0 <= split <= first.numel():
        raise MergeError(f"split={split} is out of range: expected 0..{first.numel()} for vectors of length "
                         f"{first.numel()}")
    head_a, head_b = slerp_coefficients(first, second, mix)
    tail_a, tail_b = slerp_coefficients(first, second, 1.0 - mix)
    head = head_a * first[:split] + head_b * second[:split]
    tail = tail_a * first[split:] + tail_b * second[split:]
    return torch.cat([head, tail])


def random_crossover(first: Tensor, second: Tensor, generator: torch.Generator,
                     use_split_point: bool = True) -> Tensor:
    """Draw the split index k ~ U{0..D−1} and the mix w ~ U(0, 1), then cross over (plain SLERP without split)."""
    _check_pair(first, second)
    split = int(torch.randint(0, first.numel(), (1,), generator=generator, device=generator.device).item())
    mix = float(torch.rand(1, generator=generator, dtype=torch.float64, device=generator.device).item())
    if not use_split_point:
        return slerp(first, second, mix)
    return split_point_crossover(first, second, mix, split)


def mutate(params: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """params + N(0, std²) noise on every entry (a new tensor; std = 0 returns a copy)."""
    if std == 0:
        return params.clone()
    noise = torch.randn(params.shape, generator=generator, dtype=params.dtype, device=generator.device)
    return params + std * noise.to(params.device)


# ---------------------------------------------------------------------------------------------------------
# The archive and the evolutionary loop
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Archive:
    """The population: `params` (P, D) and per-example `scores` (P, N) of its `size` occupied members."""

    params: Tensor
    scores: Tensor
    size: int = 0

    @classmethod
    def empty(cls, capacity: int, template: Tensor, data_points: int) -> Archive:
        params = torch.zeros((capacity, template.numel()), dtype=template.dtype, device=template.device)
        scores = torch.zeros((capacity, data_points), dtype=torch.float64, device=template.device)
        return cls(params, scores, 0)

    @property
    def member_scores(self) -> Tensor:
        return self.scores[: self.size]

    @property
    def members(self) -> Tensor:
        return self.params[: self.size]

    def best_index(self) -> int:
        """The member with the best raw mean score (how the paper picks the model to report)."""
        return int(torch.argmax(self.member_scores.mean(dim=1)).item())

    def offer(self, params: Tensor, scores: Tensor, alpha: float) -> int | None:
        """Add a candidate, evicting the worst by shared fitness when full; its slot, or None if it lost."""
        if self.size < self.params.shape[0]:
            slot = self.size
            self.size += 1
        else:
            slot = _worst_member(self.member_scores, scores.to(self.scores.dtype), alpha)
            if slot == self.size:
                return None
        self.params[slot] = params
        self.scores[slot] = scores.to(self.scores.dtype)
        return slot


@dataclass
class M2N2Result:
    """The final archive, its best member (by raw mean score), and how many evaluations were spent."""

    archive: Archive
    best: Tensor
    best_scores: Tensor
    evaluations: int
    history: list[float] = field(default_factory=list)


Evaluate = Callable[[Tensor], Tensor]
StepCallback = Callable[[int, Archive], None]


def _scores_of(evaluate: Evaluate, params: Tensor, data_points: int | None) -> Tensor:
    scores = torch.as_tensor(evaluate(params)).detach()
    if scores.dim() != 1 or scores.numel() == 0 or (data_points is not None and scores.numel() != data_points):
        expected = f"{data_points}" if data_points is not None else "at least one"
        raise MergeError(f"the evaluation returned scores of shape {tuple(scores.shape)}: expected a flat vector "
                         f"of {expected} per-example scores (e.g. 1.0 if example j is right)")
    _check_scores(scores.to(torch.float64)[None])
    return scores.to(device=params.device, dtype=torch.float64)


def _check_seeds(seeds: Sequence[Tensor]) -> list[Tensor]:
    if len(seeds) == 0:
        raise MergeError("the population is empty: expected at least one seed model (a flat parameter vector); "
                         "pass e.g. [parameters_to_vector(model_a.parameters()), ...]")
    vectors = [torch.as_tensor(seed).detach() for seed in seeds]
    for index, vector in enumerate(vectors):
        if vector.dim() != 1 or vector.shape != vectors[0].shape or vector.numel() == 0:
            raise MergeError(f"seed {index} has shape {tuple(vector.shape)} and seed 0 {tuple(vectors[0].shape)}: "
                             "expected non-empty flat vectors of one common length; flatten each model with "
                             "torch.nn.utils.parameters_to_vector")
    return vectors


def breed(archive: Archive, config: M2N2Config, generator: torch.Generator) -> Tensor:
    """One child from the archive: pick parents, cross over (or copy parent A), mutate."""
    rewards = _rewards(archive.member_scores, config.alpha)
    first, second = _sample_parents(rewards, generator, config.use_attraction)
    parent_a, parent_b = archive.members[first], archive.members[second]
    if config.use_crossover:
        child = random_crossover(parent_a, parent_b, generator, config.use_split_point)
    else:
        child = parent_a.clone()
    return mutate(child, config.mutation_std, generator)


def evolve(seeds: Sequence[Tensor], evaluate: Evaluate, config: M2N2Config | None = None, *, seed: int = 0,
           callback: StepCallback | None = None, progress: bool = True) -> M2N2Result:
    """Run M2N2 from seed models (flat vectors) with `evaluate(params) -> per-example scores (N,)`.

    The seeds are evaluated and offered to the archive first (they count as evaluations), then
    `config.total_evaluations` children are bred, evaluated and offered. `callback(evaluations, archive)` runs
    after every child. Randomness comes from one torch.Generator seeded with `seed` on the seeds' device.
    """
    config = config or M2N2Config()
    vectors = _check_seeds(seeds)
    generator = torch.Generator(device=vectors[0].device).manual_seed(seed)
    first_scores = _scores_of(evaluate, vectors[0], None)
    archive = Archive.empty(config.population_size, vectors[0], first_scores.numel())
    archive.offer(vectors[0], first_scores, config.alpha)
    for vector in vectors[1:]:
        archive.offer(vector, _scores_of(evaluate, vector, first_scores.numel()), config.alpha)
    evaluations, history = len(vectors), []
    bar = tqdm(total=config.total_evaluations, desc="M2N2", disable=not progress, leave=False)
    for _ in range(config.total_evaluations):
        child = breed(archive, config, generator)
        archive.offer(child, _scores_of(evaluate, child, first_scores.numel()), config.alpha)
        evaluations += 1
        history.append(float(archive.member_scores.mean(dim=1).max()))
        if callback is not None:
            callback(evaluations, archive)
        bar.update(1)
        if evaluations % 100 == 0:
            bar.set_postfix(best=f"{history[-1]:.4f}")
    bar.close()
    best = archive.best_index()
    return M2N2Result(archive, archive.members[best].clone(), archive.member_scores[best].clone(), evaluations,
                      history)

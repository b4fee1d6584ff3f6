"""The task-vector family as one composition: sparsify × consensus × combine.

Task arithmetic, TIES, DARE (linear and TIES), magnitude pruning and DAREx merges differ only in the three
choices below, so they share `merge_task_vectors` instead of each carrying its own flags:

- sparsify: a function `(delta, model_index) -> delta` (top-k by magnitude, Bernoulli drop, + a rescale);
- consensus: None, or TIES sign election ("sum" of values or "count" of signs), on weighted or unweighted deltas;
- combine: Σ_i w_i δ_i, divided by Σ w_i (over agreeing models when there is a consensus) if `normalize`,
  times `scaling` (λ), added to the base.

The order of operations follows mergekit 0.1.5's `GeneralizedTaskArithmeticMerge` (weights applied before the
sign election unless `sign_from="unweighted"`; sums accumulated like `torch.sum` over the model axis), so a
mergekit YAML merged here gives mergekit's tensors to float rounding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from deltatune.errors import ConfigError, config_check
from deltatune.merging.algebra import ops
from deltatune.merging.params import check_field_types

SparsifyFn = Callable[[Tensor, int], Tensor]
CONSENSUS_METHODS = ("sum", "count")
SIGN_SOURCES = ("weighted", "unweighted")
ZERO_SIGN_RULES = ("positive", "majority")


@dataclass(frozen=True)
class TaskModelParams:
    """Per-model parameters of the task-vector family.

    weight: the model's coefficient w_i (mergekit `weight`); may be negative (task negation).
    density: fraction of the delta's entries kept by sparsification, in [0, 1] (DARE drop rate p = 1 − density).
    """

    weight: float = 1.0
    density: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self)
        config_check(isinstance(self.weight, (int, float)) and self.weight == self.weight, "weight",
                     self.weight, "a finite number")
        config_check(0.0 <= self.density <= 1.0, "density", self.density, "a fraction in [0, 1]",
                     "density is the fraction of delta entries kept")


def check_consensus_options(consensus: str | None, sign_from: str, zero_sign: str) -> None:
    config_check(consensus is None or consensus in CONSENSUS_METHODS, "sign_election", consensus,
                 f"one of {CONSENSUS_METHODS}")
    config_check(sign_from in SIGN_SOURCES, "sign_from", sign_from, f"one of {SIGN_SOURCES}",
                 "'weighted' is mergekit's order, 'unweighted' the TIES paper's")
    config_check(zero_sign in ZERO_SIGN_RULES, "zero_sign", zero_sign, f"one of {ZERO_SIGN_RULES}")


def check_consensus_normalize(value: object) -> None:
    """normalize of a consensus merge: True divides by the agreeing weights (TIES' disjoint mean, mergekit),
    "count" by the number of agreeing models (peft's `ties` / `dare_ties`), False not at all."""
    config_check(isinstance(value, bool) or value == "count", "normalize", value,
                 "true, false or 'count' (divide by the number of agreeing models, as peft)")


def boolean_rescale(params: object, true_means: str) -> None:
    """Let a frozen params dataclass accept mergekit's boolean `rescale` (False → "none", True → `true_means`)."""
    value = params.rescale
    if isinstance(value, bool):
        object.__setattr__(params, "rescale", true_means if value else "none")


def accumulate(tensors: Sequence[Tensor], into_first: bool = False) -> Tensor:
    """Σ over a list like `torch.stack(tensors).sum(0)` (same rounding): half types accumulate in float32 and
    round once. `into_first`: reuse tensors[0]'s storage (float32/64 only) instead of a new tensor."""
    dtype = tensors[0].dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    total = tensors[0] if into_first and wide == dtype else tensors[0].to(wide, copy=True)
    for tensor in tensors[1:]:
        total += tensor
    return total.to(dtype)


_POOL: ThreadPoolExecutor | None = None
PARALLEL_MIN_NUMEL, PARALLEL_MAX_NUMEL = 1 << 18, 1 << 22


def _map_models(function: Callable[[int], Tensor], count: int, numel: int) -> list[Tensor]:
    """function(i) for every model; mid-sized tensors in a small thread pool (top-k selection and sorting are
    single-threaded kernels in torch, so two models can be trimmed at once). The largest tensors (embeddings)
    stay serial: their selection scratch memory would otherwise set the merge's peak."""
    global _POOL
    if count < 2 or not PARALLEL_MIN_NUMEL <= numel <= PARALLEL_MAX_NUMEL or torch.get_num_threads() < 2:
        return [function(i) for i in range(count)]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltatune-merge")
    return list(_POOL.map(function, range(count)))


def _deltas(base: Tensor, tensors: Sequence[Tensor], sparsify: SparsifyFn | None, inplace: bool) -> list[Tensor]:
    def delta(index: int) -> Tensor:
        value = tensors[index].sub_(base) if inplace else tensors[index] - base
        return sparsify(value, index) if sparsify is not None else value

    return _map_models(delta, len(tensors), base.numel() if sparsify is not None else 0)


def _consensus_sum(deltas: list[Tensor], weights: Sequence[Tensor], sign: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_i [sign(W_i) = s] W_i and Σ_i [sign(W_i) = s] w_i, entry by entry (the deltas are overwritten)."""
    wide = torch.float32 if sign.dtype in (torch.float16, torch.bfloat16) else sign.dtype
    divisor = torch.zeros(sign.shape, dtype=wide, device=sign.device)
    for delta, weight in zip(deltas, weights):
        agree = ops.agreement_mask(delta, sign)
        delta.mul_(agree)
        divisor.add_(agree, alpha=float(weight))  # the weight as rounded to the working dtype, like mergekit
    return accumulate(deltas, into_first=True), divisor.to(sign.dtype)


def merge_task_vectors(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
                       sparsify: SparsifyFn | None = None, consensus: str | None = None,
                       sign_from: str = "weighted", zero_sign: str = "positive", normalize: bool | str = False,
                       scaling: float = 1.0, inplace: bool = False) -> Tensor:
    """θ_0 + λ · combine(consensus(w_i · sparsify(θ_i − θ_0))), in the base's dtype.

    normalize: True divides by Σ w_i (over the agreeing models with a consensus), "count" by the number of
    (agreeing) models — peft's weighted TIES: Σ_{i∈A} w_i δ_i / |A| —, False not at all.

    inplace: the fine-tuned tensors and the base may be overwritten; memory then stays at the inputs plus a
    few temporaries.
    """
    check_consensus_options(consensus, sign_from, zero_sign)
    if not tensors:
        return base.clone()
    weight_tensors = [torch.tensor(w, dtype=base.dtype, device=base.device) for w in weights]
    deltas = _deltas(base, tensors, sparsify, inplace)
    sign = None
    if consensus is not None and sign_from == "unweighted":
        sign = ops.elect_sign(deltas, consensus, zero_sign)
    deltas = [delta.mul_(weight) for delta, weight in zip(deltas, weight_tensors)]
    if consensus is not None:
        if sign is None:
            sign = ops.elect_sign(deltas, consensus, zero_sign)
        counted = [torch.ones_like(w) for w in weight_tensors] if normalize == "count" else weight_tensors
        merged, divisor = _consensus_sum(deltas, counted, sign)
        del sign
        divisor[divisor == 0] = 1
    else:
        merged = accumulate(deltas, into_first=True)
        divisor = accumulate(weight_tensors) if normalize != "count" else torch.tensor(float(len(deltas)))
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    del deltas
    if normalize:
        merged /= divisor
    if scaling != 1:
        merged *= scaling
    return base.add_(merged) if inplace else (base + merged).to(base.dtype)


def magnitude_sparsifier(densities: Sequence[float], rescale: str = "none",
                         thresholds: Sequence[float] | None = None, tie_break: str = "all") -> SparsifyFn:
    """Top-k by |δ| per tensor (or ≥ a whole-model threshold), then an optional rescale ("none" | "l1").

    tie_break: how entries tied with the k-th largest |δ| are kept (see `ops.magnitude_keep_mask`).
    """

    def sparsify(delta: Tensor, index: int) -> Tensor:
        if densities[index] >= 1.0 and thresholds is None:
            return delta
        threshold = None if thresholds is None else thresholds[index]
        mask = ops.magnitude_keep_mask(delta, densities[index], threshold, tie_break)
        return mask_and_rescale(delta, mask, rescale, densities[index])

    return sparsify


def random_sparsifier(densities: Sequence[float], generator: Callable[[int], torch.Generator],
                      rescale: str = "inverse_density", divisors: Sequence[float] | None = None) -> SparsifyFn:
    """Bernoulli(density) keep mask (DARE), then a rescale.

    rescale: "inverse_density" → ÷ density = 1/(1 − p) (DARE paper, Eq. 2); "l1" → match the L1 norm
    (mergekit); "divisor" → ÷ divisors[i] (DAREx-q's q); "none" → DropOnly.
    """

    def sparsify(delta: Tensor, index: int) -> Tensor:
        divisor = None if divisors is None else divisors[index]
        if densities[index] >= 1.0:  # nothing to drop; DAREx's δ/q still applies (m = 1 in m ⊙ δ / q)
            return delta.div_(divisor) if rescale == "divisor" and divisor != 1 else delta
        mask = ops.random_keep_mask(delta.shape, densities[index], generator(index), delta.device)
        work = random_work_dtype(delta.dtype)
        values = delta if work == delta.dtype else delta.to(work)
        return mask_and_rescale(values, mask, rescale, densities[index], divisor).to(delta.dtype)

    return sparsify


def random_work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a random drop is masked and rescaled in: mergekit 0.1.5's `sparsify.bernoulli` upcasts float16
    to float32 on the CPU (and rounds the result once) and keeps bfloat16; float32 and float64 stay."""
    return torch.float32 if dtype == torch.float16 else dtype


RESCALE_RULES = ("none", "l1", "inverse_density", "divisor")


def mask_and_rescale(delta: Tensor, mask: Tensor, rescale: str, density: float,
                     divisor: float | None = None) -> Tensor:
    """Zero the entries outside `mask` (in place: `delta` must be a tensor the caller owns), then rescale."""
    if rescale not in RESCALE_RULES:
        raise ConfigError(f"rescale={rescale!r}: expected one of {RESCALE_RULES}")
    original_l1 = ops.l1_norm(delta) if rescale == "l1" else None
    masked = delta.mul_(mask)
    if rescale == "l1":
        before, after = _norms_in_dtype(original_l1, ops.l1_norm(masked), masked.dtype)
        if before < 1e-7 or after < 1e-7:  # mergekit's guard: leave near-empty tensors alone
            return masked
        return masked.mul_((before / after).to(masked.dtype))
    if rescale == "inverse_density" and density > 0:
        return masked.div_(density)
    if rescale == "divisor":
        return masked.div_(divisor)
    return masked


def _norms_in_dtype(before: Tensor, after: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The two L1 norms (summed in float32 for half types) as mergekit divides them: rounded to the tensor's
    dtype first (bit parity in bfloat16 and float16). A float16 norm above 65,504 is ∞ there, and ∞ / ∞ = NaN
    would wipe the tensor, so then the float32 norms are divided instead (ours: mergekit returns NaN)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return before, after
    rounded = before.to(dtype), after.to(dtype)
    return rounded if all(bool(torch.isfinite(norm)) for norm in rounded) else (before, after)

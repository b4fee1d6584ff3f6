"""Pure tensor functions of the delta algebra: tensors in, tensors out, no files, no modules.

The merge methods in `deltatune.merging.methods` are compositions of these pieces, factored as
**sparsify × consensus × combine** (the idea behind mergekit's generalized task arithmetic):

- sparsify: `magnitude_keep_mask`, `random_keep_mask`, then a rescale (`rescale_l1`, division by a factor);
- consensus: `elect_sign` + `agreement_mask` (TIES step 2);
- combine: `weighted_sum` / `disjoint_mean` (TIES step 3), then `base + scaling * merged`.

Conventions: a task vector (delta) is `finetuned - base`, per tensor. `density` is the fraction of entries
**kept** (DARE's drop rate is `p = 1 - density`). Nothing here modifies its inputs unless a function says
`inplace`. Every random choice takes a `torch.Generator`.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from deltatune.errors import ConfigError, MergeError

__all__ = [
    "task_vector", "apply_task_vector", "keep_count", "kth_largest", "magnitude_keep_mask", "random_keep_mask",
    "rescale_l1", "elect_sign", "agreement_mask", "weighted_sum", "disjoint_mean", "dare", "magnitude_prune",
    "rowwise_min_max", "quantile_clamp", "l1_norm",
]


def task_vector(finetuned: Tensor, base: Tensor) -> Tensor:
    """τ = θ_ft − θ_0 (task arithmetic, Ilharco et al. 2023, §2), in the inputs' dtype."""
    if finetuned.shape != base.shape:
        raise MergeError(f"shape {tuple(finetuned.shape)} does not match base shape {tuple(base.shape)}")
    return finetuned - base


def apply_task_vector(base: Tensor, delta: Tensor, scaling: float = 1.0) -> Tensor:
    """θ = θ_0 + λ τ (task arithmetic; λ is `scaling`)."""
    return base + delta * scaling if scaling != 1.0 else base + delta


def keep_count(numel: int, density: float) -> int:
    """How many entries a top-k trim at `density` keeps: ⌊density·n⌋, at least one when 0 < density.

    mergekit keeps `max(1, int(density * n))`; the TIES code keeps `int(K·n)` — identical except that a
    positive density never empties a non-empty tensor here.
    """
    if density >= 1.0:
        return numel
    if density <= 0.0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest entry (1-based) of a flattened tensor, as a 0-dim tensor — exactly `kthvalue`'s answer.

    Large tensors first bracket the answer with a strided sample, then select inside the (small) bracket;
    when the bracket misses (unusual data), the full `kthvalue` runs instead, so the result is always exact.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ConfigError(f"k={k} outside 1..{n}")
    if k == 1 or k == n:
        return flat.max() if k == 1 else flat.min()
    if n < (1 << 20):
        return torch.kthvalue(flat, n - k + 1).values
    bracketed = _bracketed_kth_largest(flat, k)
    return bracketed if bracketed is not None else torch.kthvalue(flat, n - k + 1).values


def _bracketed_kth_largest(flat: Tensor, k: int) -> Tensor | None:
    n = flat.numel()
    sample = flat[:: max(n // 65536, 1)]
    m = sample.numel()
    centre = k * m / n
    margin = 6.0 * math.sqrt(centre * max(1.0 - centre / m, 0.0)) + 8.0  # six binomial standard deviations
    ordered = torch.sort(sample, descending=True).values
    high = ordered[max(int(centre - margin), 1) - 1]
    low = ordered[min(int(centre + margin) + 1, m) - 1]
    above, parts = 0, []
    for chunk in flat.split(1 << 22):  # chunks keep the comparison temporaries small
        above += int(torch.count_nonzero(chunk > high))
        parts.append(chunk[(chunk >= low) & (chunk <= high)])
    if above >= k:
        return None
    window = torch.cat(parts)
    rank = k - above
    if rank > window.numel():
        return None
    return torch.kthvalue(window, window.numel() - rank + 1).values


TIE_BREAKS = ("all", "index", "argsort")
_SORT_LOCK = threading.Lock()


def magnitude_keep_mask(delta: Tensor, density: float, threshold: Tensor | float | None = None,
                        tie_break: str = "all") -> Tensor:
    """Boolean mask of the entries with the largest |δ| (TIES "trim", Yadav et al. 2023, §3 step 1).

    Without `threshold`, k = `keep_count(numel, density)`; entries whose |δ| equals the k-th largest value
    (float data has such ties, more so in half precision) are resolved by `tie_break`:
    "all" keeps every tied entry, so a few more than k may survive (the TIES code: |δ| ≥ k-th value);
    "index" keeps exactly k, lower flat indices first (deterministic, as fast as "all");
    "argsort" keeps exactly the k entries `torch.argsort(|δ|, descending=True)[:k]` keeps — mergekit's rule,
    whose choice among ties depends on the sort's internals; only tensors with such a tie pay for the sort.
    With `threshold` (a whole-model cut-off, the TIES paper's setting): every entry with |δ| ≥ threshold.
    """
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"tie_break={tie_break!r}: expected one of {TIE_BREAKS}")
    magnitude = delta.abs()
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()  # kthvalue is slow or missing for half types on CPU (mergekit upcasts too)
    if threshold is not None:
        return magnitude >= threshold
    k = keep_count(delta.numel(), density)
    if k >= delta.numel() or k == 0:
        return torch.full_like(delta, k > 0, dtype=torch.bool)
    cut = kth_largest(magnitude, k)
    if tie_break == "all":
        return magnitude >= cut
    mask = magnitude > cut
    missing = k - int(mask.sum())
    at_cut = magnitude == cut
    if missing == int(at_cut.sum()):  # no ambiguity: every tied entry fits
        return mask | at_cut
    flat_mask = mask.reshape(-1)
    if tie_break == "index":
        flat_mask[torch.nonzero(at_cut.reshape(-1)).reshape(-1)[:missing]] = True
    else:
        flat_mask.zero_()
        # a full sort needs ~5x the tensor's size in scratch memory: big ones one at a time
        with _SORT_LOCK if delta.numel() > (1 << 22) else contextlib.nullcontext():
            flat_mask[torch.argsort(magnitude.reshape(-1), descending=True)[:k]] = True
    return mask


def random_keep_mask(shape: torch.Size | Sequence[int], density: float, generator: torch.Generator,
                     device: torch.device | str | None = None) -> Tensor:
    """Bernoulli(density) keep mask: each entry survives independently with probability `density` (DARE, Eq. 1)."""
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if density <= 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    device = device or generator.device
    mask = torch.empty(shape, dtype=torch.bool, device=device)
    flat = mask.reshape(-1)
    for start in range(0, flat.numel(), 1 << 22):  # chunks keep the float draws small
        stop = min(start + (1 << 22), flat.numel())
        flat[start:stop] = torch.rand(stop - start, generator=generator, device=device) < density
    return mask


def l1_norm(values: Tensor) -> Tensor:
    """Σ |x| as a 0-dim tensor, summed in float32 for half types: a float16 sum overflows to ∞ above 65,504
    (a 7B model's MLP delta gets there), and ∞ / ∞ in an L1 rescale is NaN."""
    wide = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else values.dtype
    return values.abs().sum(dtype=wide)


def rescale_l1(masked: Tensor, original: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale `masked` so its L1 norm equals `original`'s (mergekit's `rescale: true`; not the DARE paper's 1/(1−p)).

    Left unscaled when either norm is below `eps`, as mergekit does.
    """
    before = l1_norm(original)
    after = l1_norm(masked)
    if before < eps or after < eps:
        return masked
    return masked * (before / after).to(masked.dtype)


def elect_sign(deltas: Sequence[Tensor], method: str = "sum", zero: str = "positive") -> Tensor:
    """TIES "elect" (Yadav et al. 2023, §3 step 2): the sign with the larger total mass per entry.

    method: "sum" → sign of Σ_i δ_i (the paper); "count" → sign of Σ_i sign(δ_i) (a vote count).
    zero: where the total is exactly 0 — "positive" → +1 (mergekit, peft); "majority" → the majority elected
    sign over the whole tensor (the TIES code, which does this over the whole model).
    Returns a tensor of ±1 in the deltas' dtype.
    """
    if method not in ("sum", "count"):
        raise ConfigError(f"sign election method={method!r}: expected 'sum' or 'count'")
    dtype = deltas[0].dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    total = torch.zeros(deltas[0].shape, dtype=wide, device=deltas[0].device)
    for delta in deltas:  # half types sum in float32, as torch.sum over a stack does (mergekit)
        total += delta if method == "sum" else delta.sign()
    if zero == "majority":
        elected = total.sign_()
        majority = 1.0 if float(elected.sum()) >= 0 else -1.0
        return elected.masked_fill_(elected == 0, majority).to(dtype)
    if zero != "positive":
        raise ConfigError(f"zero sign rule={zero!r}: expected 'positive' or 'majority'")
    return total.copy_(total >= 0).mul_(2).sub_(1).to(dtype)  # ±1 in the deltas' dtype


def agreement_mask(delta: Tensor, sign: Tensor) -> Tensor:
    """Entries whose sign equals the elected sign (zeros never agree): TIES' set A^p (§3 step 3)."""
    return delta.sign() == sign


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Σ_i w_i δ_i (task arithmetic with per-model weights; w_i = 1 when `weights` is None)."""
    total = torch.zeros_like(deltas[0])
    for index, delta in enumerate(deltas):
        total += delta if weights is None else delta * weights[index]
    return total


def disjoint_mean(deltas: Sequence[Tensor], sign: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """TIES "disjoint merge" (§3 step 3): Σ_{i∈A} w_i δ_i / Σ_{i∈A} w_i over the agreeing models A.

    With unit weights this is the paper's mean over agreeing entries; entries where no model agrees get 0.
    """
    total = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0])
    for index, delta in enumerate(deltas):
        weight = 1.0 if weights is None else weights[index]
        agree = agreement_mask(delta, sign)
        total += torch.where(agree, delta * weight, torch.zeros_like(delta))
        divisor += agree.to(delta.dtype) * weight
    divisor[divisor == 0] = 1
    return total / divisor


def dare(delta: Tensor, drop_rate: float, generator: torch.Generator, rescale: float | None = None) -> Tensor:
    """DARE (Yu et al. 2024, Eq. 1–2): drop each entry with probability p, divide the survivors by (1 − p).

    `rescale` replaces the divisor 1 − p: DAREx-q divides by q instead (Deng et al. 2025, §4); `rescale=1`
    gives DropOnly. Unbiased in expectation only for the paper's 1 − p.
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate={drop_rate}: expected 0 <= p < 1")
    keep = random_keep_mask(delta.shape, 1.0 - drop_rate, generator, delta.device)
    divisor = (1.0 - drop_rate) if rescale is None else rescale
    return torch.where(keep, delta / divisor, torch.zeros_like(delta))


def magnitude_prune(delta: Tensor, density: float, tie_break: str = "all") -> Tensor:
    """Keep the `density` fraction of entries with the largest |δ|, zero the rest, no rescale (TIES trim alone)."""
    return torch.where(magnitude_keep_mask(delta, density, tie_break=tie_break), delta, torch.zeros_like(delta))


def rowwise_min_max(values: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    """(x − min) / (max − min) along the last dimension (PCB's `Norm`); 0 where max == min.

    `low` / `high` override the row minimum / maximum (for statistics computed over a whole model).
    """
    low = values.amin(dim=-1, keepdim=True) if low is None else low
    high = values.amax(dim=-1, keepdim=True) if high is None else high
    span = high - low
    span = torch.where(span == 0, torch.ones_like(span), span)
    return ((values - low) / span).clamp_(min=0.0)


def quantile_clamp(values: Tensor, low_fraction: float, high_fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """Clamp each row of `values` (last dimension) to its [low, 1 − high] order statistics.

    Follows the PCB code's index rule: low = sorted[⌊d·low⌋], high = sorted[⌊d·(1 − high)⌋ − 1].
    Returns (clamped, low values, high values), the bounds with a trailing singleton dimension.
    """
    d = values.shape[-1]
    low_index = min(int(d * low_fraction), d - 1)
    high_index = max(int(d * (1.0 - high_fraction)) - 1, 0)
    low = torch.kthvalue(values, low_index + 1, dim=-1, keepdim=True).values
    high = torch.kthvalue(values, high_index + 1, dim=-1, keepdim=True).values
    return torch.maximum(torch.minimum(values, high), low), low, high

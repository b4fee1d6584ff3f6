"""Importance-based delta-parameter pruning (DAREx paper, Deng et al. ICLR 2025, §6 "importance-based DPP").

Instead of dropping delta entries at random (DARE), keep the most important ones:

- magnitude (MP): score |Δw_ij|;
- WANDA-style: score |Δw_ij| · ‖x_j‖₂, with ‖x_j‖₂ the L2 norm of input feature j over calibration tokens
  (`deltatune.merging.search.darex_q.collect_input_statistics` returns it).

The paper finds these beat random DPP when deltas are large (big learning rates, continued pre-training) and
lose to DARE/DAREx-q when deltas are small. Entries compete within each output row for WANDA (as in WANDA,
Sun et al. 2024) and within the whole tensor for magnitude; `group` overrides this. No rescale by default:
importance pruning keeps the large entries, so scaling them up would bias the output. The exact grouping and
rescale used in the paper's tables were not available to us (paper text not reachable); these are our choices.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from deltatune.errors import MergeError, config_check
from deltatune.merging.algebra import ops

GROUPS = ("row", "tensor")


def importance_scores(delta: Tensor, input_norm: Tensor | None = None) -> Tensor:
    """|Δ| (magnitude), or |Δ_ij| · ‖x_j‖₂ when the input norms of a [out, in] weight are given (WANDA)."""
    scores = delta.abs().float()
    if input_norm is None:
        return scores
    if delta.ndim != 2 or input_norm.numel() != delta.shape[1]:
        raise MergeError(f"input_norm of {input_norm.numel()} features does not fit a delta of shape "
                         f"{tuple(delta.shape)}; WANDA scores need a [out, in] weight and one norm per input")
    return scores * input_norm.float().reshape(1, -1)


def importance_keep_mask(scores: Tensor, density: float, group: str = "tensor") -> Tensor:
    """Keep the top `density` fraction of scores, over the whole tensor or within each row."""
    config_check(group in GROUPS, "group", group, f"one of {GROUPS}")
    if group == "tensor" or scores.ndim < 2:
        return ops.magnitude_keep_mask(scores, density)
    rows = scores.reshape(scores.shape[0], -1)
    k = ops.keep_count(rows.shape[1], density)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(rows, k, dim=1).indices, True)
    return mask.reshape(scores.shape)


def importance_prune(delta: Tensor, drop_rate: float, input_norm: Tensor | None = None,
                     group: str | None = None, rescale: float | None = None) -> Tensor:
    """Zero the least important `drop_rate` fraction of a delta; divide the kept entries by `rescale` if given.

    group defaults to "row" with input norms (WANDA) and "tensor" without (magnitude).
    """
    config_check(0.0 <= drop_rate < 1.0, "drop_rate", drop_rate, "0 <= p < 1")
    group = group or ("row" if input_norm is not None else "tensor")
    mask = importance_keep_mask(importance_scores(delta, input_norm), 1.0 - drop_rate, group)
    pruned = torch.where(mask, delta, torch.zeros_like(delta))
    return pruned / rescale if rescale is not None else pruned


def importance_prune_state_dict(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], drop_rate: float,
                                input_norms: Mapping[str, Tensor] | None = None,
                                keep: tuple[str, ...] = ("classifier", "lm_head")) -> dict[str, Tensor]:
    """θ_0 + pruned(θ_ft − θ_0) for every tensor; names containing a `keep` substring keep their whole delta
    (the DAREx code leaves classifier heads alone); WANDA scores where `input_norms` has the weight's name."""
    result = {}
    for name, value in finetuned.items():
        if any(pattern in name for pattern in keep) or not value.is_floating_point():
            result[name] = value.clone()
            continue
        norm = (input_norms or {}).get(name)
        result[name] = base[name] + importance_prune(value - base[name], drop_rate, norm)
    return result

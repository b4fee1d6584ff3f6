"""The (A, B) factor pairs of a model, found through the `HasLowRankPair` capability (never by a method's class).

Update rules that treat the two factors of a low-rank delta differently (LoRA+, LoRA-Pro) start here: every
active-or-not delta that declares the capability gives one `FactorPair`; every other trainable parameter of the
model (heads, biases, DoRA's magnitude, other methods' tensors) is "other" and gets the rule's plain update.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.core.capabilities import HasLowRankPair
from deltatune.core.layers import EMBEDDING
from deltatune.core.model import iter_deltas
from deltatune.errors import ConfigError


@dataclass(frozen=True)
class FactorPair:
    """One low-rank delta's factors: ΔW = scale · B · A in their matrix views (see `HasLowRankPair`)."""

    name: str  # "<module path>.<adapter name>", for messages
    down: nn.Parameter  # A, r rows
    up: nn.Parameter  # B, r columns
    scale: float
    embedding: bool  # the delta adapts an embedding table (LoRA+ gives these their own learning rate)


def factor_pairs(model: nn.Module, *, trainable_only: bool = True) -> list[FactorPair]:
    """The `FactorPair` of every delta of `model` that declares `HasLowRankPair` (by default only those whose
    two factors both require gradients)."""
    pairs = []
    for path, adapter, delta in iter_deltas(model):
        if not isinstance(delta, HasLowRankPair):
            continue
        down, up, scale = delta.lowrank_pair()
        if trainable_only and not (down.requires_grad and up.requires_grad):
            continue
        pairs.append(FactorPair(f"{path}.{adapter}", down, up, float(scale), delta.layer.kind == EMBEDDING))
    return pairs


def require_factor_pairs(model: nn.Module, rule: str) -> list[FactorPair]:
    """`factor_pairs(model)`, or a ConfigError naming the rule and the fix when there are none."""
    pairs = factor_pairs(model)
    if not pairs:
        raise ConfigError(
            f"{rule} needs a model with trainable low-rank (A, B) pairs (deltas that declare HasLowRankPair: "
            "lora, pissa, olora, dora) and this model has none; adapt it with one of those methods "
            "(deltatune.adapt(model, deltatune.LoRAConfig(...))) or use another update rule such as 'adamw' or 'sam'")
    return pairs


def other_parameters(model: nn.Module, pairs: list[FactorPair]) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter of `model` that is not a factor of `pairs`."""
    taken = {id(p) for pair in pairs for p in (pair.down, pair.up)}
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in taken]

"""Config checks and wiring shared by the budget-adaptive method files (AdaLoRA, IncreLoRA, TriAdaptLoRA,
CoLoRA) and the schedules of SaRA, ID³ and SNELLA, so each method file stays a thin layer over the engine."""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from deltatune.core.capabilities import HasOrthogonalRegularizer, HasRegularizationShare, HasSmoothingFactors
from deltatune.core.config import DeltaConfig
from deltatune.core.model import adapter_state, iter_deltas
from deltatune.errors import ConfigError, config_check

ORTHOGONAL_FORMS = ("paper", "code")


def check_share_or_steps(value: Any, field: str) -> None:
    """A step count (int >= 0) or a share of training (float in [0, 1))."""
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, float) and 0 <= value < 1)
    config_check(ok, field, value, "steps (an integer >= 0) or a share of training (a float in [0, 1))")


def check_common(config: Any) -> None:
    """Checks shared by the budget-adaptive configs: alpha, dropout, and (where present) betas, regularizer."""
    config_check(_number(config.alpha) and config.alpha > 0, "alpha", config.alpha, "a number > 0")
    config_check(_number(config.dropout) and 0 <= config.dropout < 1, "dropout", config.dropout,
                 "a probability in [0, 1)")
    for name in ("beta1", "beta2") if isinstance(config, HasSmoothingFactors) else ():
        value = getattr(config, name)
        config_check(_number(value) and 0 < value < 1, name, value, "a smoothing factor in (0, 1)",
                     "the paper uses 0.85")
    if isinstance(config, HasOrthogonalRegularizer):
        config_check(_number(config.orthogonal_weight) and config.orthogonal_weight >= 0, "orthogonal_weight",
                     config.orthogonal_weight, "a number >= 0 (0 turns the regularizer off)")
        config_check(config.orthogonal_form in ORTHOGONAL_FORMS, "orthogonal_form", config.orthogonal_form,
                     f"one of {ORTHOGONAL_FORMS}")


def check_growth_ranks(config: Any, method: str) -> None:
    """The rank fields of the growing allocators (IncreLoRA, TriAdaptLoRA): init <= target <= max rank."""
    config_check(isinstance(config.init_rank, int) and config.init_rank >= 1, "init_rank", config.init_rank,
                 "an integer >= 1")
    config_check(isinstance(config.target_rank, int) and config.target_rank >= config.init_rank, "target_rank",
                 config.target_rank, f"an integer >= init_rank={config.init_rank}",
                 f"{method} only grows: lower init_rank or raise target_rank")
    if config.rank_step is not None:
        config_check(isinstance(config.rank_step, int) and config.rank_step >= 1, "rank_step", config.rank_step,
                     "an integer >= 1, or None")
    if config.max_rank is not None:
        config_check(isinstance(config.max_rank, int) and config.max_rank >= config.target_rank, "max_rank",
                     config.max_rank, f"an integer >= target_rank={config.target_rank}, or None")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def adapter_name_of(model: nn.Module, config: DeltaConfig) -> str:
    """The name under which `config` (or the one adapter with an equal config) was adapted onto `model`."""
    configs = adapter_state(model).configs
    same = [name for name, candidate in configs.items() if candidate is config]
    equal = [name for name, candidate in configs.items() if candidate == config]
    if same or len(equal) == 1:
        return (same or equal)[0]
    if equal:
        raise ConfigError(f"adapters {equal} have this same config; build the allocator from the config object "
                          "passed to deltatune.adapt")
    raise ConfigError(f"this {type(config).__name__} is not attached to the model (adapters: {_adapters(model)}); "
                      "call deltatune.adapt(model, config) first")


def adapter_deltas(model: nn.Module, config: DeltaConfig, delta_type: type,
                   adapter: str | None = None) -> list[tuple[str, Any]]:
    """(module path, delta) for every `delta_type` delta of adapter `adapter` (default: the adapter `config` was
    adapted under, `adapter_name_of`), in module order. Schedules bind by adapter name, as the allocators do:
    a config equal to the adapted one finds the same deltas, and a schedule that would find none is refused."""
    name = adapter_name_of(model, config) if adapter is None else adapter
    found = [(path, delta) for path, _, delta in iter_deltas(model, name) if isinstance(delta, delta_type)]
    if not found:
        raise ConfigError(f"adapter {name!r} has no {delta_type.__name__} on this model (adapters: "
                          f"{_adapters(model)}); pass adapter= the name the {type(config).__name__} was adapted "
                          "under")
    return found


def _adapters(model: nn.Module) -> str:
    configs = adapter_state(model).configs
    return ", ".join(f"{name} ({type(config).__name__})" for name, config in configs.items()) or "none"


def set_mean_regularization(allocator: Any, form: str) -> None:
    """The code form averages over every P and Q tensor of the adapter: 1 / (2 × #modules) per module."""
    share = 1.0 if form == "paper" else 1.0 / (2 * len(allocator.deltas))
    for delta in allocator.deltas.values():
        if isinstance(delta, HasRegularizationShare):
            delta.regularization_share = share


def default_max_rank(max_rank: int | None, target_rank: int, layer: Any, factor: int = 4) -> int:
    """The most live components one module may hold: `max_rank`, or min(factor × target, in, out) but at least
    the target (fixed slots need a bound; the growth methods' codes have none)."""
    if max_rank is not None:
        return max_rank
    return max(target_rank, min(factor * target_rank, layer.fan_in, layer.out_features))

"""The registry of update rules: a name -> a builder `(model, lr, weight_decay, **options) -> torch optimizer`.

deltatune's Trainer builds its optimizer from it (`TrainConfig(update_rule=..., update_rule_options={...})`);
`build_update_rule` is the same call for a plain loop or a transformers Trainer. A rule's options are its
builder's keyword arguments, refused by name when unknown. SAM wraps another rule (`base`, AdamW by default),
so `update_rule="sam", update_rule_options={"rho": 0.05, "base": "loraplus"}` is LoRA+ under SAM. MGPO moves the
base weights during the gradient pass (`PerturbsForward`), which the Trainer wraps in `optimizer.perturbed()`.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.optim.lora_pro import LoRAPro
from deltatune.optim.loraplus import DEFAULT_EMBEDDING_LR, DEFAULT_RATIO, create_loraplus_optimizer
from deltatune.optim.mgpo import MGPO
from deltatune.optim.sam import DEFAULT_RHO, SAM

RuleBuilder = Callable[..., torch.optim.Optimizer]
_FROM_CONFIG = ("model", "lr", "weight_decay")
_VAR_KEYWORD = inspect.Parameter.VAR_KEYWORD


@runtime_checkable
class NeedsClosure(Protocol):
    """An optimizer whose `step(closure)` must get a closure that recomputes the loss and gradients of the
    current batch at the current parameters (SAM's second pass). deltatune's Trainer passes one to every
    optimizer that declares `needs_closure = True`, and calls `step()` plainly otherwise."""

    needs_closure: bool


@runtime_checkable
class PerturbsForward(Protocol):
    """An optimizer whose gradients must be computed at temporarily moved weights, in one pass (MGPO): the
    caller runs each step's forward and backward inside `with optimizer.perturbed():`, which moves the weights
    in and puts the exact ones back before `step()`. deltatune's Trainer does so for every optimizer that
    declares `perturbs_forward = True`; a transformers Trainer through the mixin
    `integrations.transformers.MomentumPerturbedStep`."""

    perturbs_forward: bool

    def perturbed(self) -> contextlib.AbstractContextManager[None]: ...


def trainable(model: nn.Module) -> list[dict[str, Any]]:
    """One parameter group of every trainable parameter, with `param_names`."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]


def _adamw(model: nn.Module, lr: float, weight_decay: float, **options: Any) -> torch.optim.Optimizer:
    """torch.optim.AdamW over every trainable parameter (`options`: betas, eps, ...)."""
    return torch.optim.AdamW(trainable(model), lr=lr, weight_decay=weight_decay, **options)


def _loraplus(model: nn.Module, lr: float, weight_decay: float, ratio: float = DEFAULT_RATIO,
              embedding_lr: float = DEFAULT_EMBEDDING_LR, **options: Any) -> torch.optim.Optimizer:
    """LoRA+: B at ratio · lr, A at lr (`optim.loraplus`); `options` go to AdamW."""
    return create_loraplus_optimizer(model, lr, ratio=ratio, embedding_lr=embedding_lr, weight_decay=weight_decay,
                                     **options)


def _lora_pro(model: nn.Module, lr: float, weight_decay: float, moments: str = "full",
              **options: Any) -> torch.optim.Optimizer:
    """LoRA-Pro with the paper's full-size moments (`optim.lora_pro`)."""
    return LoRAPro(model, lr=lr, weight_decay=weight_decay, moments=moments, **options)


def _lora_pro_light(model: nn.Module, lr: float, weight_decay: float, **options: Any) -> torch.optim.Optimizer:
    """LoRA-Pro's memory-light variant (not the paper's): Adam moments of the adjusted factor gradients."""
    return LoRAPro(model, lr=lr, weight_decay=weight_decay, moments="low_rank", **options)


def _sam(model: nn.Module, lr: float, weight_decay: float, rho: float = DEFAULT_RHO, base: str = "adamw",
         base_options: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """SAM (radius rho) around the update rule `base` built with `base_options`."""
    if base == "sam":
        raise ConfigError("update rule 'sam' cannot wrap itself (base='sam'); give base='adamw', 'loraplus', ...")
    if base == "mgpo":
        raise ConfigError("update rule 'sam' cannot wrap 'mgpo' (base='mgpo'): MGPO perturbs the base weights during "
                          "the one gradient pass, which SAM replaces with its own two; use update_rule='mgpo' alone "
                          "or give SAM base='adamw', 'loraplus', 'lora_pro', ...")
    inner = build_update_rule(base, model, lr=lr, weight_decay=weight_decay, **dict(base_options or {}))
    return SAM(inner, rho=rho, model=model)


def _mgpo(model: nn.Module, lr: float, weight_decay: float, rho: float | None = None, mu: float | None = None,
          beta: float | None = None, profile: str = "nlu", beta2: float = 0.999,
          eps: float = 1e-8) -> torch.optim.Optimizer:
    """LoRA-MGPO (`optim.mgpo`): AdamW with β1 = μ, the base weights perturbed by −ρ·v/‖v‖·min(10, 1/ḡ) during
    the gradient pass; rho / mu / beta default to `profile` ("nlu": 0.05 / 0.9 / 0.9, "nlg": 0.01 / 0.8 / 0.8)."""
    return MGPO(model, lr=lr, rho=rho, mu=mu, beta=beta, profile=profile, beta2=beta2, eps=eps,
                weight_decay=weight_decay)


UPDATE_RULES: dict[str, RuleBuilder] = {"adamw": _adamw, "loraplus": _loraplus, "lora_pro": _lora_pro,
                                        "lora_pro_light": _lora_pro_light, "sam": _sam, "mgpo": _mgpo}


def available_update_rules() -> tuple[str, ...]:
    return tuple(UPDATE_RULES)


def build_update_rule(rule: str, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                      **options: Any) -> torch.optim.Optimizer:
    """The optimizer of update rule `rule` ("adamw", "loraplus", "lora_pro", "lora_pro_light", "sam", "mgpo") over the
    trainable parameters of `model`. Use it in a plain loop, or hand it to a transformers Trainer as
    `Trainer(..., optimizers=(optimizer, None))` (SAM there: `integrations.transformers.SharpnessAwareStep`; MGPO:
    `MomentumPerturbedStep`, and in a plain loop `with optimizer.perturbed(): loss.backward()` before `step()`).

        optimizer = build_update_rule("lora_pro", model, lr=2e-4)
        optimizer = build_update_rule("sam", model, lr=1e-3, rho=0.1, base="loraplus")
    """
    if rule not in UPDATE_RULES:
        raise ConfigError(f"update rule {rule!r} is unknown; expected one of {available_update_rules()}")
    builder = UPDATE_RULES[rule]
    accepted = inspect.signature(builder).parameters
    own = [name for name in accepted if name not in _FROM_CONFIG and accepted[name].kind is not _VAR_KEYWORD]
    takes_more = any(p.kind is _VAR_KEYWORD for p in accepted.values())
    refused = [name for name in options if name in _FROM_CONFIG or (name not in own and not takes_more)]
    if refused:
        raise ConfigError(f"update rule {rule!r} has no option(s) {refused}; its options are {own}"
                          f"{' (and the optimizer class keywords: betas, eps, ...)' if takes_more else ''}; "
                          "lr and weight_decay come from the training config")
    try:
        return builder(model, lr, weight_decay, **options)
    except TypeError as error:  # an option the underlying optimizer class does not take
        raise ConfigError(f"update rule {rule!r} refused its options {sorted(options)}: {error}") from None

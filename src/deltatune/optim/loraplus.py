"""LoRA+ — the two factors at different learning rates (Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation
of Large Models", ICML 2024, arXiv:2402.12354; official code nikhil-ghosh-berkeley/loraplus `lora_plus.py`, and
peft's `create_loraplus_optimizer`).

With the same rate for A and B, the update of a wide model's features is inefficient (the paper's scaling
argument); LoRA+ sets η_B = λ · η_A:

    A ← A − η · u_A,    B ← B − (λ · η) · u_B            (u: the base optimizer's direction, AdamW by default)

λ = 16 (= 2⁴, the paper's rule of thumb; peft and the official code make the ratio a required argument with no
default). Factors of deltas on an embedding table get `embedding_lr` (1e-6, the default of peft and the
official code) instead, both A and B, as there. The groups come from the `HasLowRankPair` capability, so
LoRA+ works on every method that declares it (lora, pissa, olora, dora).

Deviation: peft and the official code also put every other one-dimensional parameter (biases, LayerNorm) at
λ · η; here every parameter that is not a factor (heads, biases, DoRA's magnitude) keeps the base rate η.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.errors import config_check
from deltatune.optim.pairs import other_parameters, require_factor_pairs

DEFAULT_RATIO = 16.0
DEFAULT_EMBEDDING_LR = 1e-6


def loraplus_param_groups(model: nn.Module, lr: float, *, ratio: float = DEFAULT_RATIO,
                          embedding_lr: float = DEFAULT_EMBEDDING_LR,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of `model`: "lora_A" at `lr` (first, so a trainer logs the base rate),
    "lora_B" at `ratio · lr`, "lora_embedding" (factors on embedding tables) at `embedding_lr`, "other" at
    `lr`. Empty groups are left out. Each group carries `param_names` and its `name`."""
    config_check(isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0, "ratio", ratio,
                 "a learning-rate ratio η_B / η_A > 0 (the paper's default is 16)")
    config_check(isinstance(embedding_lr, (int, float)) and embedding_lr >= 0, "embedding_lr", embedding_lr,
                 "a learning rate >= 0 for factors on embedding tables (peft's default is 1e-6)")
    config_check(lr > 0, "lr", lr, "a learning rate > 0")
    pairs = require_factor_pairs(model, "LoRA+")
    names = {id(p): n for n, p in model.named_parameters()}
    members: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_B": [], "lora_embedding": [], "other": []}
    for pair in pairs:
        if pair.embedding:
            members["lora_embedding"] += [pair.down, pair.up]
        else:
            members["lora_A"].append(pair.down)
            members["lora_B"].append(pair.up)
    members["other"] = [p for _, p in other_parameters(model, pairs)]
    rates = {"lora_A": lr, "lora_B": ratio * lr, "lora_embedding": embedding_lr, "other": lr}
    return [{"params": params, "param_names": [names[id(p)] for p in params], "lr": rates[group], "name": group,
             "weight_decay": weight_decay} for group, params in members.items() if params]


def create_loraplus_optimizer(model: nn.Module, lr: float, *, ratio: float = DEFAULT_RATIO,
                              embedding_lr: float = DEFAULT_EMBEDDING_LR, weight_decay: float = 0.0,
                              optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                              **optimizer_options: Any) -> torch.optim.Optimizer:
    """A LoRA+ optimizer for a plain PyTorch loop or a transformers Trainer (`optimizers=(opt, None)`):
    `optimizer_cls` (AdamW) over `loraplus_param_groups(model, lr, ...)`; `optimizer_options` (betas, eps, ...)
    go to `optimizer_cls`.

        optimizer = create_loraplus_optimizer(model, lr=2e-4)          # B at 16 × 2e-4
        for batch in loader:
            loss = model(**batch).loss; loss.backward(); optimizer.step(); optimizer.zero_grad()
    """
    groups = loraplus_param_groups(model, lr, ratio=ratio, embedding_lr=embedding_lr, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, weight_decay=weight_decay, **optimizer_options)

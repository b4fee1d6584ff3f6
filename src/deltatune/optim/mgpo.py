"""LoRA-MGPO — momentum-guided weight perturbation of the frozen base weight (Chang, Guo, Chang, Wu, arXiv
2502.14538 v2 / EMNLP 2025 Findings; official code llm172/LoRA-MGPO, `lora_mgpo/trainer.py` and
`lora_mgpo/config.py`). Transcribed from that code, labelled as such: the paper's body was not available to us.

Per delta with an (A, B) pair (`HasLowRankPair`: ΔW = s·B·A) and per step, before the forward/backward:

    v = s·(M_B·A + B·M_A)                          M_A, M_B: AdamW's first moments (exp_avg) of A and B
    ε = −ρ · v / (‖v‖_F + 1e-12) · min(10, 1/(ḡ + 1e-12))
    W0 ← W0 + ε   for the forward and backward only, then W0 is put back

where ḡ is an exponential moving average (β) of ‖s·(g_B·A + B·g_A)‖_F, the norm of the layer's effective-weight
gradient, updated after each backward (its first value initialises it; before it exists the factor is 1). A
layer whose optimizer state does not exist yet (the first step) or whose ‖v‖ ≤ 1e-12 or non-finite v is not
perturbed. Note the sign: ε points along the NEGATIVE momentum direction, as the code does. The step itself is
AdamW with β1 = μ (the code sets `adam_beta1=mu`). One gradient computation per step (no SAM double pass).

Defaults are the code's NLU profile (T5-base on GLUE): ρ = 0.05, μ = β = 0.9; `profile="nlg"` is its LLaMA-2-7B
profile: ρ = 0.01, μ = β = 0.8 (the code pairs them with lr 1e-4 / 2e-5, no weight decay, cosine schedule
with 3% warm-up; those belong to the training config here). β2 = 0.999 and ε_Adam = 1e-8 are AdamW's defaults.

LoRA-GGPO (v1 of the same arXiv number, the name in our seed list) is NOT implemented: its perturbation is
described in summaries only as random noise scaled by a weighted mix of gradient and weight norms, and its exact
formula, weights and defaults were not available to us (shared/methods/lowrank.md §10). We do not guess it.

Use: `optimizer.perturbed()` around the gradient pass (deltatune's Trainer does it for every optimizer that
declares `perturbs_forward = True`, `rules.PerturbsForward`), then `optimizer.step()`:

    optimizer = MGPO(model, lr=1e-4)
    with optimizer.perturbed():                 # W0 + ε in, the exact W0 back out, ḡ updated
        loss_fn(model(x), y).backward()
    optimizer.step(); optimizer.zero_grad()

Deviations from the code, on purpose: (1) the base weight is restored from a saved copy, so it is bit-identical
after every step (the code subtracts a recomputed ε, which leaves rounding residue in W0); (2) every
pair-holding delta the layer runs is perturbed (several adapters on one layer add their ε), not only the
first active peft adapter; (3) in deltatune's Trainer ḡ is updated once per optimizer step from the whole
accumulated gradient (the code's `training_step` updates it after each micro-batch; the transformers mixin
`integrations.transformers.MomentumPerturbedStep` keeps the code's behaviour); (4) works on every layer kind
whose base weight's matrix view is s·B·A's shape (Linear, transformers Conv1D, Conv, Embedding), through
`LayerInfo.from_matrix`; the code handles peft's Linear only. On DoRA, ε is added to W0 inside DoRA's
direction, as the code does with peft's `use_dora` (ḡ then uses the direction's gradient, as there).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.capabilities import HasLowRankPair
from deltatune.core.host import AdaptedLayer
from deltatune.core.model import iter_hosts
from deltatune.errors import ConfigError, TrainingError, config_check
from deltatune.optim.pairs import require_factor_pairs

PROFILES = {"nlu": {"rho": 0.05, "mu": 0.9, "beta": 0.9}, "nlg": {"rho": 0.01, "mu": 0.8, "beta": 0.8}}
MAX_SCALE = 10.0  # the code's clamp of 1/ḡ
TINY = 1e-12  # the code's mgpo_eps


@dataclass(frozen=True)
class PerturbedPair:
    """One pair-holding delta and the host whose base weight its ε goes into."""

    name: str  # "<module path>.<adapter name>"
    host: AdaptedLayer
    adapter: str
    down: nn.Parameter  # A
    up: nn.Parameter  # B
    scale: float

    def runs(self) -> bool:
        """The host computes this delta now (active, not merged, not disabled): only then is it perturbed."""
        return not self.host.disabled and self.adapter in self.host.active and self.adapter not in self.host.merged

    def views(self) -> tuple[Tensor, Tensor]:
        rank = self.down.shape[0]
        return self.down.detach().reshape(rank, -1), self.up.detach().reshape(self.up.shape[0], rank)


def perturbed_pairs(model: nn.Module) -> list[PerturbedPair]:
    """Every trainable pair-holding delta of `model` with its host; a ConfigError when there is none, or when a
    host's base weight cannot take s·B·A's matrix (no floating weight, another shape)."""
    require_factor_pairs(model, "MGPO")
    pairs = []
    for path, host in iter_hosts(model):
        for adapter, delta in host.deltas.items():
            if not isinstance(delta, HasLowRankPair):
                continue
            down, up, scale = delta.lowrank_pair()
            if down.requires_grad and up.requires_grad:
                pair = PerturbedPair(f"{path}.{adapter}", host, adapter, down, up, float(scale))
                _check_base_weight(pair)
                pairs.append(pair)
    return pairs


def _check_base_weight(pair: PerturbedPair) -> None:
    weight = getattr(pair.host.base_layer, "weight", None)
    expected = (pair.up.shape[0], pair.down[0].numel())
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise ConfigError(f"MGPO adds its perturbation to the base weight of {pair.name}, but that "
                          f"{pair.host.layer.type_name} has no floating-point weight ({type(weight).__name__}); "
                          "exclude the layer from the adapter's targets or use another update rule ('adamw')")
    if tuple(pair.host.layer.to_matrix(weight).shape) != expected:
        raise ConfigError(f"MGPO cannot add s·B·A's {expected} matrix to the base weight of {pair.name} (matrix "
                          f"view {tuple(pair.host.layer.to_matrix(weight).shape)}); this delta's pair does not "
                          "add to its host's weight: use another update rule ('adamw', 'sam')")


def _effective(pair: PerturbedPair, d_down: Tensor, d_up: Tensor) -> Tensor:
    """s·(dB·A + B·dA) in the (out, fan_in) view, in float32 or wider (the code's `.float()`)."""
    a, b = pair.views()
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    return pair.scale * (d_up.reshape(b.shape).to(dtype) @ a + b @ d_down.reshape(a.shape).to(dtype))


class MGPO(torch.optim.AdamW):
    """LoRA-MGPO (see the module docstring): AdamW with β1 = μ over every trainable parameter of `model`, plus
    the momentum-guided perturbation of the base weight under each trainable (A, B) pair.

    Args:
        model: an adapted model with trainable `HasLowRankPair` deltas (lora, pissa, olora, dora).
        lr, weight_decay: AdamW's (the code's runs: 1e-4 NLU, 2e-5 NLG, weight decay 0).
        rho, mu, beta: the radius ρ, AdamW's β1 = μ and ḡ's EMA factor β; None takes them from `profile`.
        profile: "nlu" (ρ 0.05, μ = β = 0.9; the default) or "nlg" (ρ 0.01, μ = β = 0.8), the code's two.
        beta2, eps: AdamW's second-moment factor and ε (its defaults, as the code's Trainer leaves them).
    """

    perturbs_forward = True  # `deltatune.optim.PerturbsForward`: the Trainer runs the gradient pass in perturbed()

    def __init__(self, model: nn.Module, lr: float = 1e-3, rho: float | None = None, mu: float | None = None,
                 beta: float | None = None, profile: str = "nlu", beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        config_check(profile in PROFILES, "profile", profile, f"one of {tuple(PROFILES)} (the code's two)")
        chosen = {**PROFILES[profile], **{k: v for k, v in (("rho", rho), ("mu", mu), ("beta", beta)) if v is not None}}
        config_check(_number(chosen["rho"]) and chosen["rho"] > 0, "rho", chosen["rho"],
                     "a perturbation radius ρ > 0 (the code's NLU profile: 0.05)")
        for name in ("mu", "beta"):
            config_check(_number(chosen[name]) and 0 <= chosen[name] < 1, name, chosen[name], "a number in [0, 1)")
        config_check(_number(lr) and lr > 0, "lr", lr, "a learning rate > 0")
        self.pairs = perturbed_pairs(model)
        self.rho, self.mu, self.beta = float(chosen["rho"]), float(chosen["mu"]), float(chosen["beta"])
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=lr,
                         betas=(self.mu, beta2), eps=eps, weight_decay=weight_decay)
        self.grad_ema: dict[str, Tensor] = {}  # ḡ per pair name
        self._saved: dict[Tensor, Tensor] = {}  # base weight -> its exact copy, while perturbed
        self._perturbed = False
        self._gradients_ready = False

    # --- the perturbation -----------------------------------------------------------------------------------
    def perturbation(self, pair: PerturbedPair) -> Tensor | None:
        """ε of `pair` in the (out, fan_in) view, or None when the code does not perturb this layer now."""
        m_a, m_b = self.state[pair.down].get("exp_avg"), self.state[pair.up].get("exp_avg")
        if m_a is None or m_b is None:  # no optimizer state yet: the first step runs unperturbed
            return None
        v = _effective(pair, m_a, m_b)
        norm = torch.linalg.vector_norm(v)
        if not bool(torch.isfinite(v).all()) or float(norm) <= TINY:
            return None
        ema = self.grad_ema.get(pair.name)
        factor = 1.0 if ema is None else torch.reciprocal(ema.to(v.dtype) + TINY).clamp(max=MAX_SCALE)
        return -self.rho * v / (norm + TINY) * factor

    @torch.no_grad()
    def perturb(self) -> int:
        """W0 ← W0 + ε under every running pair (a copy of each W0 is kept); returns the number of weights moved."""
        if self._perturbed:
            raise TrainingError("MGPO.perturb() was called twice without restore(); use `with optimizer.perturbed():`")
        totals: dict[Tensor, Tensor] = {}
        for pair in self.pairs:
            epsilon = self.perturbation(pair) if pair.runs() else None
            if epsilon is None:
                continue
            weight = pair.host.base_layer.weight
            native = pair.host.layer.from_matrix(epsilon)
            totals[weight] = native if weight not in totals else totals[weight] + native
        for weight, total in totals.items():
            self._saved[weight] = weight.detach().clone()
            weight.add_(total.to(weight.dtype))
        self._perturbed = True
        return len(totals)

    @torch.no_grad()
    def restore(self, update_ema: bool = True) -> None:
        """W0 ← its saved copy (bit-exact); then ḡ ← β·ḡ + (1 − β)·‖s(g_B·A + B·g_A)‖_F from the gradients now
        in `.grad` (unclipped, as the code reads them after backward)."""
        for weight, original in self._saved.items():
            weight.copy_(original)
        self._saved.clear()
        self._perturbed = False
        if not update_ema:
            return
        for pair in self.pairs:
            if not pair.runs() or pair.down.grad is None or pair.up.grad is None:
                continue
            norm = torch.linalg.vector_norm(_effective(pair, pair.down.grad, pair.up.grad))
            previous = self.grad_ema.get(pair.name)
            self.grad_ema[pair.name] = norm if previous is None else self.beta * previous + (1 - self.beta) * norm
        self._gradients_ready = True

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """Within: the base weights carry ε (run the forward and backward here). On leaving, the exact base
        weights come back and ḡ is updated (not when the block raised)."""
        self.perturb()
        try:
            yield
        except BaseException:
            self.restore(update_ema=False)
            raise
        self.restore()

    # --- the step and its state -------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """AdamW's step (β1 = μ). With a closure, the closure's gradient pass runs inside `perturbed()` first;
        without one, `perturbed()` must have wrapped the gradient pass since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.perturbed():
                loss = closure()
        elif not self._gradients_ready:
            raise TrainingError("MGPO.step() came after a gradient pass that did not run inside "
                                "optimizer.perturbed(); wrap the forward and backward in `with optimizer.perturbed():` "
                                "(deltatune's Trainer does; a transformers Trainer needs the MomentumPerturbedStep "
                                "mixin of deltatune.integrations.transformers)")
        self._gradients_ready = False
        super().step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state plus ḡ per pair (`mgpo_grad_ema`), for an exact resume."""
        state = super().state_dict()
        state["mgpo_grad_ema"] = {name: value.detach().clone() for name, value in self.grad_ema.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("mgpo_grad_ema", None)
        if saved is None:
            raise TrainingError("this optimizer state has no `mgpo_grad_ema`: it was not saved by MGPO; resume "
                                "with the update rule that wrote it")
        unknown = sorted(set(saved) - {pair.name for pair in self.pairs})
        if unknown:
            raise TrainingError(f"the saved MGPO state names pairs {unknown} that this model does not have; "
                                "resume with the model and adapters it was saved from")
        super().load_state_dict(state_dict)
        device = self.pairs[0].down.device
        self.grad_ema = {name: torch.as_tensor(value).to(device) for name, value in saved.items()}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

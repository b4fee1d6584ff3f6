"""ReMax: REINFORCE with the greedy decode's reward as the baseline (Li et al., ICML 2024; `liziniu/ReMax`).

One step on a batch of prompts x (the official `generate_experience` / `compute_returns` / `compute_loss`):

1. sample a response y ~ π_θ(·|x) (temperature 1, top-p 0.9, as the official `_generate_sequence`);
2. greedy-decode a baseline response ȳ from the same policy, without gradients;
3. reward both with the same reward function: A = clip(r(x, y) − r(x, ȳ), −c, c), c = 5;
4. per-token KL penalty on the sampled tokens, no gradient: k_t = −β·(log π_θ(y_t|·) − log π_ref(y_t|·));
5. returns over the n response tokens, R_t = k_t + γ^(n − t)·A for t = 0 … n − 1 (the KL is *not* summed over
   later tokens, and even the last token gets γ·A, as in the official `compute_returns`);
6. loss = −Σ_t m_t·R_t·log π_θ(y_t | x, y_<t) / Σ_t m_t over the batch; one gradient step per rollout batch.

The paper's estimator is ∇θ ≈ Σ_t ∇θ log π_θ(y_t|·)·(r(x, y) − r(x, ȳ)): the greedy reward is a baseline that
needs no value model, which is where ReMax saves PPO's critic memory.

The reference π_ref is the same model with its adapters bypassed (`deltatune.disabled`): no second copy of the
weights. So the model must carry at least one delta (LoRA, DoRA, ... any method `disabled` can bypass); a plain
model is refused. The response ends at the first <eos> (which is one of its tokens) or after `max_new_tokens`.

A plain loop (the only form: ReMax's step generates text, so it is not a `Trainer` loss)::

    remax = ReMax(model, tokenizer, reward_fn)          # reward_fn(texts, references) -> one float per text
    for prompts, references in batches:                 # prompts: token-id lists (with <bos>), unpadded
        stats = remax.step(optimizer, prompts, references)

Defaults are those of the released training scripts (`run_llama2_7b.sh`, `run_opt_1.3b.sh`): β = 0.05, γ = 0.99
(argparse defaults in `main.py` are 0.1 / 0.95), reward clip 5, temperature 1, top-p 0.9. Deviations: answers are
at most `max_new_tokens` = 24 tokens (the gloss-generation task's length; the scripts allow 256); the official
code replaces an answer of at most one token by a space token, we keep it (the <eos> is a token, so the loss is
defined); every forward runs in eval mode (the scripts pass --disable_actor_dropout); log π is taken from the
full softmax of the logits while sampling uses top-p, exactly as the official code does (the sampler is not π_θ).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.model import disabled, iter_hosts
from deltatune.errors import ConfigError, TrainingError, config_check

RewardFunction = Callable[[list[str], Sequence[Any]], "Sequence[float] | Tensor"]


@dataclass(frozen=True)
class ReMaxConfig:
    """ReMax hyper-parameters (defaults: the released scripts; see the module docstring).

    Args:
        kl_coef: β of the per-token KL penalty k_t = −β(log π_θ − log π_ref), >= 0.
        gamma: γ discounting the advantage towards earlier tokens, in (0, 1].
        reward_clip: c in A = clip(r(y) − r(ȳ), −c, c), > 0 (math.inf: no clipping).
        temperature: sampling temperature of y, > 0.
        top_p: nucleus mass of the sampler, in (0, 1] (1: plain sampling).
        max_new_tokens: longest response, >= 1.
    """

    kl_coef: float = 0.05
    gamma: float = 0.99
    reward_clip: float = 5.0
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        config_check(_real(self.kl_coef) and self.kl_coef >= 0, "kl_coef", self.kl_coef, "a number >= 0 (0.05)")
        config_check(_real(self.gamma) and 0 < self.gamma <= 1, "gamma", self.gamma, "a discount in (0, 1] (0.99)")
        config_check(_real(self.reward_clip, allow_inf=True) and self.reward_clip > 0, "reward_clip",
                     self.reward_clip, "a bound > 0 on |r(y) − r(ȳ)| (5.0; math.inf for none)")
        config_check(_real(self.temperature) and self.temperature > 0, "temperature", self.temperature,
                     "a sampling temperature > 0 (1.0)")
        config_check(_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a mass in (0, 1] (0.9)")
        config_check(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
                     and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")


def _real(value: Any, allow_inf: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) or (allow_inf and value == math.inf)


@dataclass
class ReMaxStats:
    """What one step saw. `kl` is the exact per-token KL(π_θ ‖ π_ref) over the vocabulary, averaged over the
    response tokens; `kl_sampled` the sampled-token estimate mean(log π_θ − log π_ref)."""

    loss: float
    reward: float
    baseline_reward: float
    advantage: float
    kl: float
    kl_sampled: float
    response_length: float


@dataclass
class Rollout:
    """A batch of responses: `sequences` (B, P + T) = left-padded prompts then responses, `attention_mask`,
    `response_mask` (B, T) = 1 up to and including the first <eos>, `texts` the decoded responses."""

    sequences: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_width: int
    texts: list[str]


def remax_returns(kl_penalty: Tensor, advantage: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """R_t = k_t + γ^(n − t)·A for the n response tokens of each row, 0 after them (official `compute_returns`).

    kl_penalty (B, T) is k_t = −β(log π_θ − log π_ref) on the sampled tokens; advantage (B,); response_mask (B, T)
    must be a prefix mask (ones, then zeros)."""
    if kl_penalty.shape != response_mask.shape or advantage.shape != kl_penalty.shape[:1]:
        raise TrainingError(f"remax_returns got kl_penalty {tuple(kl_penalty.shape)}, advantage "
                            f"{tuple(advantage.shape)}, response_mask {tuple(response_mask.shape)}: expected "
                            "(B, T), (B,), (B, T)")
    mask = response_mask.to(kl_penalty.dtype)
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise TrainingError("response_mask has a 1 after a 0: expected each row to be ones then zeros "
                            "(the response up to its <eos>)")
    length = mask.sum(dim=1, keepdim=True)
    position = torch.arange(mask.shape[1], dtype=kl_penalty.dtype, device=kl_penalty.device)
    discount = torch.pow(torch.as_tensor(gamma, dtype=kl_penalty.dtype), length - position)
    return (kl_penalty + discount * advantage.to(kl_penalty.dtype).unsqueeze(1)) * mask


def remax_loss(log_probs: Tensor, returns: Tensor, response_mask: Tensor) -> Tensor:
    """−Σ m_t·R_t·log π_θ(y_t|·) / Σ m_t (official `actor_loss_fn`); `returns` carry no gradient."""
    mask = response_mask.to(log_probs.dtype)
    return -(returns.detach() * log_probs * mask).sum() / mask.sum().clamp(min=1.0)


class ReMax:
    """The ReMax training strategy for a causal LM with adapters (see the module docstring).

    Args:
        model: a transformers-style causal LM (`generate`, `forward(...).logits`) carrying deltatune adapters.
        tokenizer: gives `pad_token_id`, `eos_token_id` and `batch_decode`.
        reward_fn: `reward_fn(texts, references) -> B floats`, called once on the sampled and once on the greedy
            responses of a batch, with the same references (one per prompt, passed through untouched).
        config: the hyper-parameters (ReMaxConfig()).
        seed: seeds the sampler of step k with seed + k (the global RNG is left as it was); None samples from
            the global RNG.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, reward_fn: RewardFunction,
                 config: ReMaxConfig | None = None, *, seed: int | None = None) -> None:
        config = ReMaxConfig() if config is None else config
        if not isinstance(config, ReMaxConfig):
            raise ConfigError(f"config must be a ReMaxConfig, got {type(config).__name__}")
        if not any(True for _ in iter_hosts(model)):
            raise ConfigError("ReMax's reference model is the base with the adapters disabled, and this model has "
                              "no adapters: add one first, e.g. deltatune.adapt(model, LoRAConfig())")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("no parameter of the model requires a gradient: ReMax has nothing to train "
                              "(deltatune.adapt(..., trainable=True) makes the adapter trainable)")
        if not callable(reward_fn):
            raise ConfigError(f"reward_fn must be callable (texts, references) -> floats, got {reward_fn!r}")
        for name in ("pad_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ConfigError(f"the tokenizer has no {name}: ReMax pads prompts and ends responses with it")
        if seed is not None and not isinstance(seed, int):
            raise ConfigError(f"seed={seed!r} is invalid: expected an integer or None")
        self.model, self.tokenizer, self.reward_fn, self.config, self.seed = model, tokenizer, reward_fn, config, seed
        self.steps = 0

    # --- generation ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, greedy: bool) -> Rollout:
        """Sampled (greedy=False) or greedy responses to the prompts, without gradients, in eval mode."""
        ids, mask = self._left_padded(prompts)
        options: dict[str, Any] = {"do_sample": False}
        if not greedy:
            options = {"do_sample": True, "temperature": self.config.temperature, "top_p": self.config.top_p,
                       "top_k": 0}  # top_k=0: transformers' generation config would otherwise add top-k 50
        with torch.no_grad(), _eval_mode(self.model), self._sampler_rng(greedy):
            output = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=self.config.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **options)
        response = output[:, ids.shape[1]:]
        response_mask = _through_first_eos(response, self.tokenizer.eos_token_id)
        response = response.masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
        texts = [text.strip() for text in self.tokenizer.batch_decode(response, skip_special_tokens=True)]
        return Rollout(torch.cat([ids, response], dim=1), torch.cat([mask, response_mask], dim=1), response_mask,
                       ids.shape[1], texts)

    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise TrainingError("ReMax got an empty prompt batch or an empty prompt: expected token-id lists, "
                                "each with at least one token (the tokenizer's <bos>)")
        width = max(len(prompt) for prompt in prompts)
        device = next(self.model.parameters()).device
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids.to(device), mask.to(device)

    def _sampler_rng(self, greedy: bool) -> contextlib.AbstractContextManager:
        if greedy or self.seed is None:
            return contextlib.nullcontext()
        return _seeded(self.seed + self.steps, next(self.model.parameters()).device)

    # --- the loss -----------------------------------------------------------------------------------------
    def response_logits(self, rollout: Rollout) -> Tensor:
        """Logits (B, T, V) that predict each response token; positions follow the left padding (as generate's)."""
        position_ids = (rollout.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                            position_ids=position_ids).logits
        return logits[:, rollout.prompt_width - 1:-1]

    def rewards(self, texts: list[str], references: Sequence[Any]) -> Tensor:
        """The reward function's B floats as a float64 tensor; refused if the count is wrong or one is not finite."""
        values = torch.as_tensor(self.reward_fn(texts, references), dtype=torch.float64).reshape(-1).cpu()
        if values.shape[0] != len(texts) or not bool(torch.isfinite(values).all()):
            raise TrainingError(f"reward_fn returned {values.tolist()} for {len(texts)} responses: expected one "
                                "finite float per response")
        return values

    def loss(self, prompts: Sequence[Sequence[int]], references: Sequence[Any]) -> tuple[Tensor, ReMaxStats]:
        """ReMax's loss on one prompt batch (steps 1-6 of the module docstring) and what the step saw."""
        if len(references) != len(prompts):
            raise TrainingError(f"{len(references)} references for {len(prompts)} prompts: expected one reference "
                                "per prompt (what reward_fn compares each response with)")
        sampled, greedy = self.generate(prompts, greedy=False), self.generate(prompts, greedy=True)
        reward, baseline = self.rewards(sampled.texts, references), self.rewards(greedy.texts, references)
        advantage = (reward - baseline).clamp(-self.config.reward_clip, self.config.reward_clip)
        with _eval_mode(self.model):
            logits = self.response_logits(sampled)
            with torch.no_grad(), disabled(self.model):
                reference_logits = self.response_logits(sampled)
        log_softmax, reference_log_softmax = F.log_softmax(logits, dim=-1), F.log_softmax(reference_logits, dim=-1)
        tokens = sampled.sequences[:, sampled.prompt_width:].unsqueeze(-1)
        log_probs = log_softmax.gather(-1, tokens).squeeze(-1)
        reference_log_probs = reference_log_softmax.gather(-1, tokens).squeeze(-1)
        mask = sampled.response_mask.to(log_probs.dtype)
        kl_penalty = -self.config.kl_coef * (log_probs.detach() - reference_log_probs)  # step 4, no gradient
        returns = remax_returns(kl_penalty, advantage.to(log_probs), mask, self.config.gamma)
        loss = remax_loss(log_probs, returns, mask)
        with torch.no_grad():
            full_kl = (log_softmax.exp() * (log_softmax - reference_log_softmax)).sum(-1)
            tokens_count = float(mask.sum())
            stats = ReMaxStats(
                loss=float(loss), reward=float(reward.mean()), baseline_reward=float(baseline.mean()),
                advantage=float(advantage.mean()), kl=float((full_kl * mask).sum()) / tokens_count,
                kl_sampled=float(((log_probs - reference_log_probs) * mask).sum()) / tokens_count,
                response_length=tokens_count / len(prompts))
        return loss, stats

    def step(self, optimizer: torch.optim.Optimizer, prompts: Sequence[Sequence[int]],
             references: Sequence[Any]) -> ReMaxStats:
        """One ReMax update: loss, backward, optimizer step (one gradient step per rollout batch)."""
        optimizer.zero_grad(set_to_none=True)
        loss, stats = self.loss(prompts, references)
        if not torch.isfinite(loss):
            raise TrainingError(f"the ReMax loss is {float(loss)}: a reward or log-probability is not finite; "
                                "check reward_fn and lower the learning rate")
        loss.backward()
        optimizer.step()
        self.steps += 1
        return stats


def _through_first_eos(response: Tensor, eos_id: int) -> Tensor:
    """1 at every response position up to and including the first <eos>, 0 after it (long)."""
    is_eos = (response == eos_id).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # how many <eos> strictly before each position
    return (eos_before == 0).long()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every module's own mode again (a model in `set_training_mode` keeps its
    frozen base in eval and its deltas in train: a plain `model.train()` would not restore that)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield

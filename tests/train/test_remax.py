"""ReMax: the returns R_t = k_t + γ^(n−t)·A and the loss against hand computations and a float64 token-by-token
recomputation; the greedy baseline (same reward, no gradient path); KL zero at init; LoRA and DoRA; bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

import deltatune as dt  # noqa: E402
from deltatune.errors import ConfigError, DeltatuneError, TrainingError  # noqa: E402
from deltatune.train.remax import ReMax, ReMaxConfig, remax_loss, remax_returns  # noqa: E402

PAD, BOS, EOS, VOCAB = 0, 1, 2, 12
PROMPTS = [[BOS, 3, 4], [BOS, 5], [BOS, 6, 7, 8], [BOS, 9]]


class LetterTokenizer:
    """ids 3.. decode to letters a, b, ...; <pad>, <bos>, <eos> are special."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def batch_decode(self, rows: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(ord("a") + int(i) - 3) for i in row if int(i) > EOS) for row in rows]


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return LlamaForCausalLM(config).double().eval()


def adapted(method: str = "lora", init: str = "kaiming", seed: int = 0) -> torch.nn.Module:
    model = tiny_lm(seed)
    config = dt.config_for(method, rank=2, targets=["q_proj", "v_proj", "down_proj"], init=init)
    return dt.adapt(model, config)


def letter_count(letter: str):
    def reward(texts: list[str], references) -> list[float]:
        return [text.count(letter) / 4 for text in texts]
    return reward


# --- the defining equations -------------------------------------------------------------------------------
def test_returns_by_hand() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.5, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    advantage = torch.tensor([2.0, -1.0], dtype=torch.float64)
    # Row 0 has n = 3: γ^3·2, γ^2·2, γ·2 with γ = 0.5; row 1 has n = 2: γ^2·(−1), γ·(−1).
    expected = torch.tensor([[0.1 + 0.25, 0.2 + 0.5, 0.3 + 1.0, 0.0], [0.4 - 0.25, 0.5 - 0.5, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(remax_returns(kl, advantage, mask, gamma=0.5), expected, rtol=0, atol=1e-15)


def official_returns(kl: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The backward loop of ReMax's `compute_returns`, written out: the reward is discounted before each use."""
    returns = torch.zeros_like(kl)
    for row in range(kl.shape[0]):
        reward = float(advantage[row])
        for t in reversed(range(int(mask[row].sum()))):
            reward *= gamma
            returns[row, t] = kl[row, t] + reward
    return returns


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), gamma=st.floats(0.05, 1.0),
       seed=st.integers(0, 10_000))
def test_returns_match_the_official_backward_loop(lengths: list[int], gamma: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    kl = torch.randn(len(lengths), 6, generator=generator, dtype=torch.float64)
    advantage = torch.randn(len(lengths), generator=generator, dtype=torch.float64) * 3
    mask = (torch.arange(6).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    expected = official_returns(kl, advantage, mask, gamma)
    torch.testing.assert_close(remax_returns(kl * mask, advantage, mask, gamma), expected, rtol=1e-12, atol=1e-12)


def test_loss_by_hand() -> None:
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    by_hand = -(1 * -1 + 2 * -2 + 3 * -3 + 4 * -0.5 + 5 * -4) / 5  # the masked token is left out
    loss = remax_loss(log_probs, returns, mask)
    assert loss.item() == pytest.approx(by_hand, abs=1e-14)
    loss.backward()  # ∂loss/∂log π_t = −m_t·R_t/Σm
    torch.testing.assert_close(log_probs.grad, -(returns * mask) / 5, rtol=0, atol=1e-15)


def token_log_probs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log π(y_t | x, y_<t) of one unpadded row, one forward over the whole row (no padding, no position ids)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_loss_and_gradient_match_a_float64_recomputation_row_by_row() -> None:
    model = adapted(init="random")  # B ≠ 0: the policy differs from the reference, so the KL term is live
    config = ReMaxConfig(kl_coef=0.3, gamma=0.9, max_new_tokens=5)
    remax = ReMax(model, LetterTokenizer(), letter_count("c"), config, seed=3)
    rollouts = []
    generate = remax.generate
    remax.generate = lambda prompts, greedy: rollouts.append(generate(prompts, greedy=greedy)) or rollouts[-1]
    loss, stats = remax.loss(PROMPTS, [None] * len(PROMPTS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trainable)

    sampled, greedy = rollouts
    rewards = torch.tensor(letter_count("c")(sampled.texts, None), dtype=torch.float64)
    baselines = torch.tensor(letter_count("c")(greedy.texts, None), dtype=torch.float64)
    total, count = 0.0, 0
    for row, prompt in enumerate(PROMPTS):
        n = int(sampled.response_mask[row].sum())
        response = sampled.sequences[row, sampled.prompt_width:sampled.prompt_width + n].tolist()
        log_probs = token_log_probs(model, prompt, response)
        with torch.no_grad(), dt.disabled(model):
            reference = token_log_probs(model, prompt, response)
        advantage = float(rewards[row] - baselines[row])
        for t in range(n):
            ret = -0.3 * (log_probs[t] - reference[t]).item() + 0.9 ** (n - t) * advantage
            total = total - ret * log_probs[t]
            count += 1
    by_hand = total / count
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-10)
    for got, expected in zip(grads, torch.autograd.grad(by_hand, trainable)):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert stats.reward == pytest.approx(float(rewards.mean()))
    assert stats.kl > 0 and stats.kl_sampled != 0


# --- the greedy baseline --------------------------------------------------------------------------------------
def test_the_greedy_baseline_is_the_greedy_decode_rewarded_by_the_same_function() -> None:
    model = adapted(init="random")
    calls = []
    references = ["ref-a", "ref-b", "ref-c", "ref-d"]

    def reward(texts, refs):
        calls.append((list(texts), refs))
        return [float(len(text)) for text in texts]

    remax = ReMax(model, LetterTokenizer(), reward, ReMaxConfig(max_new_tokens=6), seed=0)
    _, stats = remax.loss(PROMPTS, references)
    assert len(calls) == 2 and calls[0][1] is references and calls[1][1] is references
    greedy_texts = remax.generate(PROMPTS, greedy=True).texts
    assert calls[1][0] == greedy_texts
    with torch.no_grad():  # the same texts from transformers' own greedy decoding, row by row, no padding
        for prompt, text in zip(PROMPTS, greedy_texts):
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=PAD, eos_token_id=EOS)
            assert LetterTokenizer().batch_decode(out[:, len(prompt):])[0] == text
    expected = sum(map(len, calls[0][0])) / 4 - sum(map(len, calls[1][0])) / 4
    assert stats.advantage == pytest.approx(expected)


def test_no_advantage_and_no_kl_means_no_gradient_through_the_baseline() -> None:
    model = adapted(init="random")
    remax = ReMax(model, LetterTokenizer(), lambda texts, refs: [0.7] * len(texts), ReMaxConfig(kl_coef=0.0),
                  seed=1)
    loss, stats = remax.loss(PROMPTS, [None] * 4)
    loss.backward()
    assert stats.advantage == 0 and float(loss) == 0.0
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters() if p.requires_grad)


def test_the_advantage_is_clipped_at_reward_clip() -> None:
    model = adapted(init="random")
    rewards = iter([[100.0] * 4, [0.0] * 4])
    remax = ReMax(model, LetterTokenizer(), lambda texts, refs: next(rewards), seed=0)
    _, stats = remax.loss(PROMPTS, [None] * 4)
    assert stats.advantage == 5.0


def test_kl_is_zero_at_init() -> None:
    model = adapted()  # LoRA's B = 0: the policy is the reference
    remax = ReMax(model, LetterTokenizer(), letter_count("d"), seed=0)
    _, stats = remax.loss(PROMPTS, [None] * 4)
    assert stats.kl == 0.0 and stats.kl_sampled == 0.0


def test_the_sampler_is_seeded_and_leaves_the_global_rng_alone() -> None:
    texts = []
    for _ in range(2):
        remax = ReMax(adapted(init="random"), LetterTokenizer(), letter_count("a"), seed=7)
        torch.manual_seed(123)
        texts.append(remax.generate(PROMPTS, greedy=False).texts)
    assert texts[0] == texts[1]
    remax = ReMax(adapted(), LetterTokenizer(), letter_count("a"), seed=1)  # (building the toy seeds torch)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    remax.generate(PROMPTS, greedy=False)
    torch.testing.assert_close(torch.rand(3), expected)


def test_every_module_gets_its_own_mode_back() -> None:
    model = adapted()
    model.train()
    model.model.layers[0].mlp.eval()  # a mixed state, as set_training_mode leaves a model with a frozen base
    modes = {name: module.training for name, module in model.named_modules()}
    ReMax(model, LetterTokenizer(), letter_count("a"), seed=0).loss(PROMPTS, [None] * 4)
    assert {name: module.training for name, module in model.named_modules()} == modes


# --- composition ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_trains_the_adapter_only_and_moves_away_from_the_reference(method: str) -> None:
    model = adapted(method)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    remax = ReMax(model, LetterTokenizer(), letter_count("e"), ReMaxConfig(max_new_tokens=6), seed=0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    first = remax.step(optimizer, PROMPTS, [None] * 4)
    for _ in range(3):
        last = remax.step(optimizer, PROMPTS, [None] * 4)
    assert first.kl == 0.0 and last.kl > 0
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert any(not torch.equal(p, trainable[name]) for name, p in model.named_parameters() if name in trainable)
    assert remax.steps == 4 and math.isfinite(last.loss)


# --- bad input ------------------------------------------------------------------------------------------------
def test_a_model_without_adapters_is_refused() -> None:
    with pytest.raises(ConfigError, match="no adapters"):
        ReMax(tiny_lm(), LetterTokenizer(), letter_count("a"))


@pytest.mark.parametrize("field, value", [("kl_coef", -0.1), ("gamma", 0.0), ("gamma", 1.5), ("reward_clip", 0),
                                          ("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.1),
                                          ("max_new_tokens", 0), ("max_new_tokens", 2.0), ("kl_coef", math.nan)])
def test_bad_config_values_are_refused(field: str, value) -> None:
    with pytest.raises(ConfigError, match=field):
        ReMaxConfig(**{field: value})


def test_bad_rewards_references_and_prompts_are_refused() -> None:
    model = adapted()
    with pytest.raises(TrainingError, match="one finite float per response"):
        ReMax(model, LetterTokenizer(), lambda texts, refs: [1.0]).loss(PROMPTS, [None] * 4)
    with pytest.raises(TrainingError, match="one finite float per response"):
        ReMax(model, LetterTokenizer(), lambda texts, refs: [math.nan] * 4).loss(PROMPTS, [None] * 4)
    remax = ReMax(model, LetterTokenizer(), letter_count("a"))
    with pytest.raises(TrainingError, match="one reference per prompt"):
        remax.loss(PROMPTS, [None] * 3)
    with pytest.raises(TrainingError, match="empty prompt"):
        remax.loss([[BOS], []], [None] * 2)
    with pytest.raises(ConfigError, match="ReMaxConfig"):
        ReMax(model, LetterTokenizer(), letter_count("a"), config={"kl_coef": 0.1})
    with pytest.raises(ConfigError, match="callable"):
        ReMax(model, LetterTokenizer(), reward_fn="minilm")


def test_merged_adapters_are_refused_with_the_fix() -> None:
    model = adapted()
    remax = ReMax(model, LetterTokenizer(), letter_count("a"))
    dt.merge(model)
    with pytest.raises(DeltatuneError, match="unmerge"):
        remax.loss(PROMPTS, [None] * 4)


def test_returns_refuse_a_mask_with_holes() -> None:
    with pytest.raises(TrainingError, match="ones then zeros"):
        remax_returns(torch.zeros(1, 3), torch.zeros(1), torch.tensor([[1, 0, 1]]), 0.9)

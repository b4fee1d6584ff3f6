"""Input-side deltas: VPT (shallow, deep) and prompt tuning, checked against hand-built prompted sequences."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from contract.test_input_side import tiny_bert
from contract.toy_models import tiny_vit
from deltatune.errors import ConfigError, NotMergeableError


def _blocks_by_hand(vit, sequence: torch.Tensor) -> torch.Tensor:
    for block in vit.layers:
        sequence = block(sequence)
    return vit.layernorm(sequence)


def test_shallow_vpt_equals_prompts_concatenated_after_cls_without_position_embedding():
    vit, x = tiny_vit()
    base = copy.deepcopy(vit)
    dt.adapt(vit, dt.VPTConfig(num_tokens=3, deep=False))
    prompt = vit.layers[0].deltas["default"].prompt.detach()
    with torch.no_grad():
        embedded = base.embeddings(x)  # CLS + patches, position embedding added
        by_hand = torch.cat([embedded[:, :1], prompt.expand(2, -1, -1), embedded[:, 1:]], dim=1)
        expected = _blocks_by_hand(base, by_hand)
        got = vit(pixel_values=x).last_hidden_state
    assert got.shape[1] == embedded.shape[1] + 3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_deep_vpt_replaces_the_slots_before_every_later_block_and_keeps_the_length():
    vit = _two_block_vit()
    dt.adapt(vit, dt.VPTConfig(num_tokens=2, deep=True))
    seen = []
    for block in vit.layers:
        block.base_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        vit(pixel_values=torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert [s.shape[1] for s in seen] == [1 + 2 + 4, 1 + 2 + 4]  # CLS + prompts + 4 patches, at every block
    deep_prompt = vit.layers[1].deltas["default"].prompt.detach()
    torch.testing.assert_close(seen[1][:, 1:3], deep_prompt.expand(2, -1, -1), rtol=0, atol=0)
    assert not torch.equal(seen[0][:, 1:3], seen[1][:, 1:3])


def _two_block_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_channels=3)
    return ViTModel(config).double().eval()


def test_prompt_tuning_extends_the_attention_mask_and_equals_a_hand_built_prompted_call():
    encoder, inputs = tiny_bert()
    base = copy.deepcopy(encoder)
    dt.adapt(encoder, dt.PromptTuningConfig(num_tokens=3))
    prompt = encoder.backbone.deltas["default"].prompt.detach()
    with torch.no_grad():
        embeds = base.backbone.get_input_embeddings()(inputs["input_ids"])
        mask = torch.cat([torch.ones(2, 3, dtype=inputs["attention_mask"].dtype), inputs["attention_mask"]], dim=1)
        by_hand = base.backbone(inputs_embeds=torch.cat([prompt.expand(2, -1, -1), embeds], 1), attention_mask=mask)
        got = encoder(**inputs).last_hidden_state
    assert got.shape == (2, 6, 16)  # the prompts' outputs are dropped
    torch.testing.assert_close(got, by_hand.last_hidden_state[:, 3:], rtol=0, atol=1e-12)
    # the padded positions of example 1 are masked: changing them changes nothing at its real positions
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][1, 4:] = 1
    with torch.no_grad():
        again = encoder(**changed).last_hidden_state
    torch.testing.assert_close(again[1, :4], got[1, :4], rtol=0, atol=1e-12)


class PlainEncoder(nn.Module):
    """No transformers: an embedding, a CLS token and nn.TransformerEncoderLayer blocks in `layers`."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden[:, 0]


def test_vpt_on_a_plain_module_through_the_documented_hook(tmp_path):
    torch.manual_seed(0)
    model, x = PlainEncoder().double().eval(), torch.randn(2, 5, 4, dtype=torch.float64)
    reference = model(x)
    base = copy.deepcopy(model)
    dt.adapt(model, dt.VPTConfig(num_tokens=2))  # blocks="layers", width read from the block (8)
    adapted = model(x)
    assert not torch.allclose(adapted, reference)
    dt.save_adapter(model, tmp_path / "a")
    # equal up to rounding: torch's encoder layer may take another kernel order in a fresh copy
    torch.testing.assert_close(dt.load_adapter(copy.deepcopy(base), tmp_path / "a")(x), adapted, rtol=0, atol=1e-12)
    with pytest.raises(NotMergeableError):
        dt.merge(model)
    dt.set_training_mode(model)  # VPT keeps the frozen backbone in eval mode (its dropout off) while training
    assert not model.layers[0].base_layer.training and model.layers[0].deltas["default"].training
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-12)


def test_bad_configs_are_refused_by_name():
    with pytest.raises(ConfigError, match="num_tokens"):
        dt.VPTConfig(num_tokens=0)
    with pytest.raises(ConfigError, match="dropout"):
        dt.VPTConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="init_token_ids"):
        dt.PromptTuningConfig(init="text")
    with pytest.raises(ConfigError, match="init"):
        dt.PromptTuningConfig(init="sampled")


def test_vocabulary_and_text_inits_copy_embedding_rows():
    encoder, _ = tiny_bert()
    table = encoder.backbone.get_input_embeddings().weight.detach()
    dt.adapt(encoder, dt.PromptTuningConfig(num_tokens=5, init="text", init_token_ids=(3, 4)))
    prompt = encoder.backbone.deltas["default"].prompt.detach()
    torch.testing.assert_close(prompt, table[[3, 4, 3, 4, 3]], rtol=0, atol=0)
    dt.adapt(encoder, dt.PromptTuningConfig(num_tokens=4, init="vocabulary", seed=1), "vocab")
    rows = encoder.backbone.deltas["vocab"].prompt.detach()
    assert all(any(torch.equal(row, entry) for entry in table) for row in rows)


def test_init_from_copies_a_saved_adapter_and_names_a_mismatching_tensor(tmp_path):
    vit, _ = tiny_vit()
    source = dt.adapt(copy.deepcopy(vit), dt.VPTConfig(num_tokens=3))
    dt.save_adapter(source, tmp_path / "source")
    target = dt.adapt(copy.deepcopy(vit), dt.VPTConfig(num_tokens=3), init_from=tmp_path / "source")
    torch.testing.assert_close(dt.adapter_state_dict(target), dt.adapter_state_dict(source), rtol=0, atol=0)
    fresh = copy.deepcopy(vit)
    with pytest.raises(ConfigError, match=r"layers\.0\.prompt.*\(3, 16\)"):
        dt.adapt(fresh, dt.VPTConfig(num_tokens=4), init_from=tmp_path / "source")
    assert not dt.adapter_names(fresh)  # refused before anything was attached


def test_generate_with_prompt_tuning_on_the_wordnet_lm_uses_the_prompt():
    from deltatune.data.wordnet_lm import load_wordnet_lm

    model, tokenizer = load_wordnet_lm()
    model.eval()
    inputs = tokenizer("dog (noun):", return_tensors="pt")
    ids = tuple(tokenizer("cat (verb): to move quickly").input_ids)
    dt.adapt(model, dt.PromptTuningConfig(num_tokens=4, init="text", init_token_ids=ids))
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 6
    with dt.disabled(model):
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert not torch.equal(generated, plain), "the prompt made no difference"
    sequence = inputs["input_ids"]  # greedy without the cache: the prompted model recomputed at every step
    with torch.no_grad():
        for _ in range(6):
            step = model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
            sequence = torch.cat([sequence, step.argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(generated, sequence, rtol=0, atol=0)

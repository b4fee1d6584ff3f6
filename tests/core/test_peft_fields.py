"""Every field of peft's LoraConfig is honoured or refused by name, and the folders peft writes for common
options load with peft's own outputs (float64, tiny random transformers models; folders made by peft itself)."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import deltatune as dt
from deltatune.methods import lora_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_every_peft_lora_field_is_classified_exactly_once():
    names = [f.name for f in dataclasses.fields(peft.LoraConfig)]
    tables = [set(lora_peft.HONOURED), set(lora_peft.REFUSED_UNLESS), set(lora_peft.IRRELEVANT)]
    unclassified = [n for n in names if not any(n in table for table in tables)]
    assert not unclassified, f"classify these peft LoraConfig fields in deltatune/methods/lora_peft.py: {unclassified}"
    assert all(len(a & b) == 0 for i, a in enumerate(tables) for b in tables[i + 1:])
    assert set().union(*tables) <= set(names)  # no stale entries either


def test_refused_fields_default_to_what_peft_writes():
    defaults = peft.LoraConfig().to_dict()
    for name, default in lora_peft.REFUSED_UNLESS.items():
        assert lora_peft._is_default(defaults[name], default), name


def _bert(num_labels=3):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=32, num_labels=num_labels)
    return config


def _llama():
    return transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def _peft_folder(base, config, path, perturb=True):
    """`base` wrapped by peft with `config`, every adapter tensor made non-zero, saved to `path`; returns the
    peft model (eval mode)."""
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if perturb and ("lora_" in name or "modules_to_save" in name):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    peft_model.save_pretrained(path)
    return peft_model.eval()


def _out(model, ids):
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def test_seq_cls_folder_with_classifier_head_loads_exactly(tmp_path):
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_bert()).double().eval()
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    peft_model = _peft_folder(base, config, tmp_path / "cls")
    saved = json.loads((tmp_path / "cls" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier", "score"]
    ids = torch.randint(0, 50, (3, 7))
    expected = _out(peft_model, ids)
    assert not torch.allclose(expected, _out(base, ids))
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "cls")
    assert dt.active_adapters(ours) == ("default",)
    torch.testing.assert_close(_out(ours, ids), expected, rtol=0, atol=1e-12)


def test_embed_tokens_and_lm_head_folder_with_saved_base_embedding_loads_exactly(tmp_path):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_llama()).double().eval()
    config = peft.LoraConfig(r=2, target_modules=["embed_tokens", "lm_head", "q_proj"])
    peft_model = _peft_folder(base, config, tmp_path / "emb")
    ids = torch.randint(0, 64, (2, 6))
    expected = _out(peft_model, ids)
    assert not torch.allclose(expected, _out(base, ids))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "emb")
    torch.testing.assert_close(_out(ours, ids), expected, rtol=0, atol=1e-12)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_saved_base_embedding_that_differs_from_the_model_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_llama()).double().eval()
    _peft_folder(base, peft.LoraConfig(r=2, target_modules=["embed_tokens"]), tmp_path / "emb")
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.embed_tokens.weight[3] += 1
    digest = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(dt.DeltatuneError, match=r"base weight 'model.embed_tokens.base_layer.weight' that differs"):
        dt.load_adapter(other, tmp_path / "emb")
    assert all(torch.equal(digest[k], v) for k, v in other.state_dict().items())


def test_gpt2_conv1d_folder_with_fan_in_fan_out_loads_exactly(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    base = transformers.GPT2Model(config).double().eval()
    peft_model = _peft_folder(base, peft.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
                              tmp_path / "gpt2")
    ids = torch.randint(0, 40, (2, 5))
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "gpt2")
    torch.testing.assert_close(_out(ours, ids), _out(peft_model, ids), rtol=0, atol=1e-12)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
def test_inits_that_leave_the_base_alone_load_exactly(tmp_path, init):
    torch.manual_seed(0)
    base = transformers.BertModel(_bert()).double().eval()
    peft_model = _peft_folder(base, peft.LoraConfig(r=2, target_modules=["query", "key"], init_lora_weights=init),
                              tmp_path / "init")
    ids = torch.randint(0, 50, (2, 5))
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "init")
    torch.testing.assert_close(_out(ours, ids), _out(peft_model, ids), rtol=0, atol=1e-12)


def test_eva_folder_without_rank_redistribution_loads_like_peft(tmp_path):
    torch.manual_seed(0)
    base = transformers.BertModel(_bert()).eval()
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=1.0))
    peft_model = peft.get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True)
    peft.initialize_lora_eva_weights(peft_model, dataloader=[{"input_ids": torch.randint(0, 50, (4, 8))}] * 3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    peft_model.save_pretrained(tmp_path / "eva")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "eva").eval()
    ids = torch.randint(0, 50, (2, 6))
    ours = dt.load_adapter(copy.deepcopy(base), tmp_path / "eva")
    torch.testing.assert_close(_out(ours, ids), _out(reloaded, ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(_out(ours, ids), _out(peft_model.eval(), ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("init,name", [("pissa_niter_4", "PiSSA \\(randomized SVD\\)")])
def test_inits_that_rewrite_the_base_are_refused_with_the_conversion(tmp_path, init, name):
    """pissa and olora load as their own methods (tests/methods/test_pissa.py); a residual deltatune cannot
    rebuild is refused with peft's conversion as the fix."""
    torch.manual_seed(0)
    base = transformers.BertModel(_bert()).eval()
    _peft_folder(base, peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=init), tmp_path / "p", False)
    model = copy.deepcopy(base)
    with pytest.raises(dt.DeltatuneError, match=f"{name} subtracts .*path_initial_model_for_weight"):
        dt.load_adapter(model, tmp_path / "p")
    assert not dt.adapter_names(model)


def test_trainable_token_folder_is_refused_with_the_true_reason(tmp_path):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_llama()).eval()
    _peft_folder(base, peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
                 tmp_path / "tok")
    with pytest.raises(dt.DeltatuneError, match=r"trainable_token_indices=\[1, 2\].*cannot reproduce"):
        dt.load_adapter(copy.deepcopy(base), tmp_path / "tok")

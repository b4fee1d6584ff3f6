"""Reliability on real model shapes: adapted layers stay reachable, tied weights, normalization statistics,
and the save_pretrained trap (issue 9, "any model's layers stay reachable, and what is saved reproduces what was
trained")."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from contract.toy_models import tiny_gpt2, tiny_resnet
from deltatune.core.attach import load_trainable_state_dict, trainable_state_dict
from deltatune.core.deltatune_format import WEIGHTS_FILE
from deltatune.core.guards import SAVE_PRETRAINED_WARNING
from deltatune.core.host import AdaptedLayer
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError, NotMergeableError, TargetError
from reliability.support import assert_one_line_message, tree_digest


def _digest(model: nn.Module) -> dict[str, str]:
    """State-dict key -> sha256 of the tensor bytes (every buffer and parameter, deltas included)."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def _tiny_llama(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=40, tie_word_embeddings=tied, pad_token_id=0)
    return LlamaForCausalLM(config).double().eval(), torch.randint(1, 40, (2, 5))


def _set_lora_b(model: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=generator, dtype=delta.lora_B.dtype))


# --- 1. the base layer's attributes stay reachable ----------------------------------------------------------
LAYER_ATTRIBUTES = {
    "linear": (lambda: nn.Linear(6, 5), ("weight", "bias", "in_features", "out_features")),
    "conv": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1),
             ("weight", "bias", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode")),
    "embedding": (lambda: nn.Embedding(12, 6, padding_idx=0),
                  ("weight", "num_embeddings", "embedding_dim", "padding_idx", "max_norm")),
    "conv1d_hf": (lambda: Conv1D(5, 6), ("weight", "bias", "nf", "nx")),
}


@pytest.mark.parametrize("kind", sorted(LAYER_ATTRIBUTES))
def test_adapted_layer_answers_with_its_base_layers_attributes(kind):
    build, names = LAYER_ATTRIBUTES[kind]
    model = nn.Sequential(build())
    base = model[0]
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["0"]))
    host = model[0]
    assert isinstance(host, AdaptedLayer) and host.base_layer is base
    for name in names:
        value = getattr(host, name)
        assert value is getattr(base, name) or value == getattr(base, name), name
    assert host.weight is base.weight and host.weight.dtype == base.weight.dtype


def test_writes_to_base_attributes_reach_the_base_layer_and_keys_stay_the_base_keys():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    keys = set(model.state_dict())
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["1"]))
    shared = model[0].weight
    model[1].weight = nn.Parameter(torch.randn(10, 4))  # as transformers' tie_weights / resize code assign
    model[1].out_features = 10
    assert "weight" not in model[1]._parameters and model[1].base_layer.weight is not shared
    assert {k for k in model.state_dict() if ".deltas." not in k} == keys
    assert model[1].weight is model[1].base_layer.weight


def test_host_fields_are_its_own_and_a_missing_attribute_is_an_attribute_error():
    model = nn.Sequential(nn.Linear(4, 3))
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["0"]))
    model[0].disabled = True
    assert "disabled" not in model[0].base_layer.__dict__
    model[0].disabled = False
    with pytest.raises(AttributeError, match="no_such_attribute"):
        model[0].no_such_attribute  # noqa: B018
    assert not hasattr(model[0], "no_such_attribute")


def test_adapted_models_deepcopy_and_pickle_with_identical_outputs():
    model, ids = tiny_gpt2()
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["c_attn"]))
    _set_lora_b(model)
    expected = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(other(ids).logits, expected)
        assert other.save_pretrained.__self__ is other  # the guard of a copy guards the copy


def test_output_embeddings_of_an_adapted_head_expose_their_weight():
    model, ids = _tiny_llama()
    head = model.lm_head.weight
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["lm_head", "embed_tokens"]))
    assert model.get_output_embeddings().weight is head
    assert model.get_input_embeddings().num_embeddings == 40 and model.get_input_embeddings().padding_idx == 0
    model(ids)


# --- resize_token_embeddings ----------------------------------------------------------------------------------
def _resize_cases():
    def gpt2_head():
        model, _ = tiny_gpt2()
        return dt.adapt(model, dt.LoRAConfig(rank=2, targets=["lm_head"], untie=True)), "lm_head"

    def llama_embedding():
        model, _ = _tiny_llama()
        return dt.adapt(model, dt.LoRAConfig(rank=2, targets=["embed_tokens"])), "model.embed_tokens"

    def llama_head():
        model, _ = _tiny_llama()
        return dt.adapt(model, dt.LoRAConfig(rank=2, targets=["lm_head"])), "lm_head"

    return {"gpt2-head": gpt2_head, "llama-embedding": llama_embedding, "llama-head": llama_head}


@pytest.mark.parametrize("case", sorted(_resize_cases()))
def test_resize_token_embeddings_of_an_adapted_embedding_is_refused_before_anything_changes(case):
    model, path = _resize_cases()[case]()
    before = _digest(model)
    with pytest.raises(TargetError) as caught:
        model.resize_token_embeddings(48)
    assert_one_line_message(caught.value, path, "resize", "unload")
    assert _digest(model) == before and isinstance(model.get_submodule(path), AdaptedLayer)


def test_resize_token_embeddings_works_when_no_embedding_is_adapted_and_after_unload():
    model, ids = _tiny_llama()
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["q_proj"]))
    _set_lora_b(model)
    model.resize_token_embeddings(48)
    assert model.get_input_embeddings().weight.shape[0] == 48 and model.lm_head.weight.shape[0] == 48
    assert len(list(dt.iter_deltas(model))) == 1
    other, _ = _tiny_llama()
    dt.adapt(other, dt.LoRAConfig(rank=2, targets=["embed_tokens"]))
    dt.unload(other)
    assert "resize_token_embeddings" not in other.__dict__
    other.resize_token_embeddings(44)
    assert other.get_input_embeddings().weight.shape[0] == 44


# --- 2. weight ties -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,other", [("lm_head", "transformer.wte"), ("wte", "lm_head")])
def test_a_tied_target_is_refused_naming_both_paths_and_the_option(target, other):
    model, _ = tiny_gpt2()
    before = _digest(model)
    with pytest.raises(TargetError) as caught:
        dt.adapt(model, dt.LoRAConfig(rank=2, targets=[target]))
    assert_one_line_message(caught.value, "lm_head.weight", "transformer.wte.weight", "untie=True", other)
    assert _digest(model) == before and model.lm_head.weight is model.transformer.wte.weight
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


@pytest.mark.parametrize("operation", ["merge", "unload"])
def test_merging_into_a_weight_re_tied_after_untying_is_refused(operation):
    model, _ = tiny_gpt2()
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["lm_head"], untie=True))
    _set_lora_b(model)
    model.tie_weights()  # transformers assigns the shared tensor back (through the host, onto the base layer)
    assert model.lm_head.weight is model.transformer.wte.weight
    before = _digest(model)
    with pytest.raises(NotMergeableError) as caught:
        dt.merge(model) if operation == "merge" else dt.unload(model, merge=True)
    assert_one_line_message(caught.value, "lm_head", "transformer.wte.weight", "untie=True")
    assert _digest(model) == before and isinstance(model.lm_head, AdaptedLayer)


class _SharedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.again = self.first  # one module object at two paths

    def forward(self, x):
        return self.again(self.first(x))


def test_a_module_registered_at_two_paths_is_refused_even_with_untie():
    model = _SharedModule()
    for untie in (False, True):
        with pytest.raises(TargetError) as caught:
            dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"], untie=untie))
        assert_one_line_message(caught.value, "'first'", "'again'", "exclude")
    assert model.first is model.again and isinstance(model.first, nn.Linear)


class _TiedToy(nn.Module):
    """A plain torch model whose output layer reuses the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.out = nn.Linear(4, 9, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.embed(ids)))


def test_a_plain_torch_tie_is_found_and_untied_merges_exactly_leaving_the_other_module_alone():
    torch.manual_seed(0)
    model, ids = _TiedToy().double(), torch.randint(0, 9, (3, 4))
    with pytest.raises(TargetError, match="out.weight is tied to embed.weight"):
        dt.adapt(model, dt.LoRAConfig(rank=2, targets=["out"]))
    embedding = model.embed.weight.detach().clone()
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["out"], untie=True))
    _set_lora_b(model)
    expected = model(ids)
    dt.merge(model)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-12)
    assert torch.equal(model.embed.weight, embedding)


def test_untie_must_be_a_boolean():
    with pytest.raises(ConfigError) as caught:
        dt.LoRAConfig(untie="yes")
    assert_one_line_message(caught.value, "untie='yes'", "True or False")


def test_an_untied_adapter_reloads_onto_a_fresh_tied_model_and_merges_exactly(tmp_path):
    model, ids = tiny_gpt2()
    fresh = copy.deepcopy(model)
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["lm_head"], untie=True))
    _set_lora_b(model)
    expected = model(ids).logits.detach()
    dt.save_adapter(model, tmp_path / "adapter")
    embedding = fresh.transformer.wte.weight.detach().clone()
    loaded = dt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(loaded(ids).logits, expected)
    dt.merge(loaded)
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-10)
    assert torch.equal(loaded.transformer.wte.weight, embedding)


# --- 3. normalization statistics ----------------------------------------------------------------------------
def _trained_resnet(tmp_path):
    base, x = tiny_resnet()
    model = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, targets=None, layer_types=("conv",)))
    model.train()
    model(x)  # one train-mode forward moves every running statistic
    model.eval()
    dt.save_adapter(model, tmp_path / "adapter")
    return base, model, x


def _rewrite_weights(folder, change) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    # A hand-edited file no longer matches the config's weights record; drop the record (older folders have
    # none) so the load reaches the statistics checks under test.
    config = folder / "deltatune_config.json"
    meta = json.loads(config.read_text())
    meta.pop("weights_sha256", None)
    meta.pop("weights_bytes", None)
    config.write_text(json.dumps(meta))


@pytest.mark.parametrize("fault", ["wrong-shape", "one-missing"])
def test_a_file_with_bad_normalization_statistics_is_refused_and_the_model_is_unchanged(tmp_path, fault):
    base, _, _ = _trained_resnet(tmp_path)
    key = "resnet.embedder.embedder.normalization.running_mean"

    def change(tensors):
        if fault == "wrong-shape":
            tensors[key] = torch.zeros(5, dtype=torch.float64)
        else:
            del tensors[key]

    _rewrite_weights(tmp_path / "adapter", change)
    before = _digest(base)
    with pytest.raises(AdapterFileError) as caught:
        dt.load_adapter(base, tmp_path / "adapter")
    assert_one_line_message(caught.value, key, "another model" if fault == "one-missing" else "shape")
    assert _digest(base) == before and not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_a_file_without_statistics_keeps_the_models_own(tmp_path):
    base, model, x = _trained_resnet(tmp_path)
    statistics = [k for k in load_file(str(tmp_path / "adapter" / WEIGHTS_FILE)) if ".deltas." not in f".{k}"
                  and "normalization" in k]
    assert statistics, "the trained statistics were not saved"
    _rewrite_weights(tmp_path / "adapter", lambda tensors: [tensors.pop(k) for k in statistics])
    own = {k: v.clone() for k, v in base.named_buffers()}
    loaded = dt.load_adapter(base, tmp_path / "adapter")
    assert all(torch.equal(v, own[k]) for k, v in loaded.named_buffers() if k in own)


def test_peft_save_warns_naming_the_statistics_it_leaves_out(tmp_path):
    _, model, _ = _trained_resnet(tmp_path)
    with pytest.warns(UserWarning, match="running statistics.*running_mean.*format='deltatune'"):
        dt.save_adapter(model, tmp_path / "peft", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model without such layers saves silently
        plain = dt.adapt(nn.Sequential(nn.Linear(4, 4)), dt.LoRAConfig(rank=2, targets=["0"]))
        dt.save_adapter(plain, tmp_path / "plain", format="peft")


def test_training_checkpoints_keep_the_statistics(tmp_path):
    base, model, x = _trained_resnet(tmp_path)
    state = trainable_state_dict(model)
    assert "resnet.embedder.embedder.normalization.running_var" in state
    restored = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, targets=None, layer_types=("conv",)))
    load_trainable_state_dict(restored, state)
    assert torch.equal(restored.eval()(x).logits, model(x).logits)


def test_only_norms_that_track_statistics_contribute():
    from deltatune.core.running_stats import running_statistics

    model = nn.Sequential(nn.InstanceNorm1d(3), nn.InstanceNorm1d(3, track_running_stats=True), nn.LayerNorm(3),
                          nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3))
    assert sorted(running_statistics(model)) == [
        "1.num_batches_tracked", "1.running_mean", "1.running_var",
        "4.num_batches_tracked", "4.running_mean", "4.running_var",
    ]


# --- 4. the save_pretrained trap ----------------------------------------------------------------------------
def test_save_pretrained_of_an_adapted_model_warns_once_naming_the_working_paths(tmp_path):
    model, _ = tiny_gpt2()
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        copy.deepcopy(model).save_pretrained(tmp_path / "plain")
    assert not [w for w in plain if "save_adapter" in str(w.message)]
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["c_attn"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "a")
        model.save_pretrained(tmp_path / "b")
    ours = [w for w in caught if str(w.message) == SAVE_PRETRAINED_WARNING]
    assert len(ours) == 1 and "save_adapter" in SAVE_PRETRAINED_WARNING and "save_merged" in SAVE_PRETRAINED_WARNING
    assert (tmp_path / "b" / "config.json").exists()  # it still saves as asked


def test_save_merged_round_trips_through_from_pretrained_and_leaves_the_model_unchanged(tmp_path):
    from transformers import GPT2LMHeadModel

    model, ids = tiny_gpt2()
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["c_attn", "lm_head"], untie=True))
    _set_lora_b(model)
    expected = model(ids).logits.detach()
    before = _digest(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the merged copy is plain: no save_pretrained warning
        dt.save_merged(model, tmp_path / "merged")
    assert _digest(model) == before and isinstance(model.lm_head, AdaptedLayer)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-10)


def test_save_merged_of_a_plain_torch_model_writes_a_loadable_safetensors(tmp_path):
    from safetensors.torch import load_model

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = dt.adapt(copy.deepcopy(reference), dt.LoRAConfig(rank=2, targets=["0", "2"]))
    _set_lora_b(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    dt.save_merged(model, tmp_path / "merged")
    load_model(reference, str(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(reference(x), model(x), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError) as caught:
        dt.save_merged(model, tmp_path / "again", max_shard_size="1GB")
    assert_one_line_message(caught.value, "max_shard_size", "save_pretrained")
    assert not (tmp_path / "again").exists()


def test_save_merged_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(DeltatuneError) as caught:
        dt.save_merged(nn.Linear(3, 3), tmp_path / "x")
    assert_one_line_message(caught.value, "no adapter")
    assert not (tmp_path / "x").exists()


def test_trainer_checkpoints_hold_the_adapter_that_reloads_the_trained_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    from deltatune.integrations.transformers import SaveAdapterCallback

    model, ids = tiny_gpt2()
    fresh = copy.deepcopy(model)
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["c_attn"]))
    data = [{"input_ids": torch.randint(0, 40, (6,)), "labels": torch.randint(0, 40, (6,))} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, learning_rate=1e-2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True, logging_strategy="no",
                             disable_tqdm=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=model, args=args, train_dataset=data, callbacks=[SaveAdapterCallback()]).train()
    assert sum(str(w.message) == SAVE_PRETRAINED_WARNING for w in caught) == 1
    for folder in ("checkpoint-1/adapter", "checkpoint-2/adapter", "adapter"):
        assert (tmp_path / "run" / folder / "deltatune_config.json").exists(), folder
    model.eval()
    loaded = dt.load_adapter(fresh, tmp_path / "run" / "checkpoint-2" / "adapter")
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("folder", ["../outside", "", "/abs"])
def test_the_trainer_callback_refuses_a_folder_outside_the_checkpoint(folder, tmp_path):
    from deltatune.integrations.transformers import SaveAdapterCallback

    digest = tree_digest(tmp_path)
    with pytest.raises(ConfigError) as caught:
        SaveAdapterCallback(folder=folder)
    assert_one_line_message(caught.value, "folder=", "sub-folder")
    assert tree_digest(tmp_path) == digest

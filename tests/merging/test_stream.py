"""Streaming merges over sharded checkpoints: same tensors as in memory, HF output layout, bounded memory."""
from __future__ import annotations

import hashlib
import json
import weakref

import pytest
import torch
import yaml

from deltatune.merging import config_from_dict, load_config, merge_state_dicts, run_merge
from deltatune.merging.algebra.family import TaskModelParams
from deltatune.merging.config.resolve import layer_position
from deltatune.merging.io.checkpoint import Checkpoint
from deltatune.merging.methods.dare import DareModelParams, DareTiesParams
from deltatune.merging.methods.task_arithmetic import TaskArithmeticParams
from deltatune.merging.methods.ties import TiesModelParams, TiesParams
from merging.tiny_checkpoints import load_folder, make_models, save_checkpoint, tiny_state


@pytest.fixture
def models(tmp_path):
    return make_models(tmp_path)


def _config(method, base_dir, dirs, model_parameters, parameters=None, **extra):
    raw = {"merge_method": method, "base_model": str(base_dir),
           "models": [{"model": str(d), "parameters": p} for d, p in zip(dirs, model_parameters)],
           "parameters": parameters or {}, **extra}
    return config_from_dict(raw, None, yaml.safe_dump(raw))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_ties_stream_equals_the_in_memory_merge_and_writes_an_hf_folder(models, tmp_path):
    base_dir, dirs, base, tuned = models
    before = [_digest(d) for d in [base_dir, *dirs]]
    weights, densities = [1.0, 0.5, 0.3], [0.5, 0.7, 0.4]
    config = _config("ties", base_dir, dirs, [{"weight": w, "density": d} for w, d in zip(weights, densities)],
                     {"lambda": 0.9})
    report = run_merge(config, tmp_path / "out", shard_bytes=500, progress=False)
    out = tmp_path / "out"
    merged = load_folder(out)
    expected = merge_state_dicts("ties", base, tuned, TiesParams(scaling=0.9, sign_from="weighted",
                                 zero_sign="positive", trim_scope="tensor", tie_break="argsort"),
                                 [TiesModelParams(weight=w, density=d) for w, d in zip(weights, densities)])
    assert set(merged) == set(base)
    for name in base:
        assert torch.equal(merged[name], expected[name]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and report.shards == len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert (out / "tokenizer.json").is_file() and "merge_method: ties" in (out / "deltatune_merge.yml").read_text()
    assert [_digest(d) for d in [base_dir, *dirs]] == before  # inputs untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_task_arithmetic_gradients_and_filters_follow_mergekit_rules(models, tmp_path):
    base_dir, dirs, base, tuned = models
    weight = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    config = _config("task_arithmetic", base_dir, dirs[:1], [{"weight": weight}], {"lambda": 2.0})
    merged = load_folder(run_merge(config, tmp_path / "out", progress=False).out_dir)
    for name in base:
        if not base[name].is_floating_point():
            assert torch.equal(merged[name], base[name])
            continue
        w = layer_position(name, 3) if "mlp" in name else 0.5
        torch.testing.assert_close(merged[name], base[name] + 2.0 * w * (tuned[0][name] - base[name]))
    assert layer_position("model.layers.2.mlp.up_proj.weight", 3) == 1.0
    assert layer_position("model.embed_tokens.weight", 3) == 0.0


def test_paper_semantics_and_model_scope_trim_match_the_in_memory_merge(models, tmp_path):
    base_dir, dirs, base, tuned = models
    config = _config("ties", base_dir, dirs, [{"density": 0.3}] * 3, semantics="paper")
    merged = load_folder(run_merge(config, tmp_path / "out", progress=False).out_dir)
    expected = merge_state_dicts("ties", base, tuned, TiesParams(), [TiesModelParams(density=0.3)] * 3)
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0)


def test_random_methods_are_seeded_per_tensor_not_per_layout(tmp_path):
    base_dir, dirs, base, tuned = make_models(tmp_path / "a", shards=1)
    _, dirs_b, _, _ = make_models(tmp_path / "b", shards=3)
    parameters = [{"density": 0.4, "weight": 1.0}] * 3
    first = load_folder(run_merge(_config("dare_ties", base_dir, dirs, parameters, seed=5), tmp_path / "o1",
                                  progress=False).out_dir)
    second = load_folder(run_merge(_config("dare_ties", base_dir, dirs_b, parameters, seed=5), tmp_path / "o2",
                                   shard_bytes=300, progress=False).out_dir)
    in_memory = merge_state_dicts("dare_ties", base, tuned, DareTiesParams(rescale="l1", sign_from="weighted",
                                  zero_sign="positive"), [DareModelParams(density=0.4)] * 3, seed=5)
    for name in base:
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], in_memory[name])


def test_dtype_casting_and_bfloat16_inputs(tmp_path):
    base_dir, dirs, base, tuned = make_models(tmp_path, dtype=torch.bfloat16)
    plain = load_folder(run_merge(_config("task_arithmetic", base_dir, dirs, [{"weight": 1.0}] * 3),
                                  tmp_path / "o1", progress=False).out_dir)
    assert plain["model.norm.weight"].dtype == torch.bfloat16
    cast = run_merge(_config("task_arithmetic", base_dir, dirs, [{"weight": 1.0}] * 3, dtype="float32",
                             out_dtype="float16"), tmp_path / "o2", progress=False).out_dir
    merged = load_folder(cast)
    assert merged["model.norm.weight"].dtype == torch.float16 and merged["model.rotary.step"].dtype == torch.int64
    assert json.loads((cast / "config.json").read_text())["torch_dtype"] == "float16"
    expected = merge_state_dicts("task_arithmetic", {k: v.float() if v.is_floating_point() else v
                                                     for k, v in base.items()},
                                 [{k: v.float() if v.is_floating_point() else v for k, v in t.items()}
                                  for t in tuned], TaskArithmeticParams(), [TaskModelParams()] * 3)
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"],
                               expected["model.layers.1.mlp.up_proj.weight"].half())


def test_single_file_inputs_and_a_base_listed_among_models(tmp_path):
    from safetensors.torch import save_file

    base, tuned = tiny_state(0), tiny_state(1)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    raw = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base.safetensors"),
           "models": [{"model": str(tmp_path / "base.safetensors")},
                      {"model": str(tmp_path / "tuned.safetensors"), "parameters": {"weight": 0.5}}]}
    out = run_merge(config_from_dict(raw), tmp_path / "out", progress=False).out_dir
    merged = load_folder(out)
    norm = "model.norm.weight"
    torch.testing.assert_close(merged[norm], (base[norm] + tuned[norm]) / 2)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


def test_memory_holds_a_few_tensor_groups_not_whole_models(models, tmp_path, monkeypatch):
    base_dir, dirs, base, _ = models
    alive, peak = [0], [0]
    original = Checkpoint.read

    def counting_read(self, name, dtype=None):
        tensor = original(self, name, dtype)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    run_merge(_config("ties", base_dir, dirs, [{"density": 0.5, "weight": 1.0}] * 3), tmp_path / "out",
              progress=False)
    groups = len(dirs) + 1
    assert len(base) * groups > 40 and peak[0] <= 2 * groups  # this group + the one read ahead


ISSUE16_METHODS = {"della": {"density": 0.5, "epsilon": 0.1, "weight": 1.0},
                   "della_linear": {"density": 0.5, "weight": 0.5}, "sce": {}, "nuslerp": {"weight": 1.0},
                   "multislerp": {"weight": 1.0}, "slerp": {}, "model_stock": {},
                   "breadcrumbs_ties": {"density": 0.5}}


@pytest.mark.parametrize("method", sorted(ISSUE16_METHODS))
def test_every_issue16_method_streams_a_few_tensor_groups_at_a_time(method, models, tmp_path, monkeypatch):
    base_dir, dirs, base, _ = models
    dirs = dirs[:{"slerp": 1, "nuslerp": 2}.get(method, 3)]
    alive, peak = [0], [0]
    original = Checkpoint.read

    def counting_read(self, name, dtype=None):
        tensor = original(self, name, dtype)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    parameters = ISSUE16_METHODS[method]
    run_merge(_config(method, base_dir, dirs, [parameters] * len(dirs)), tmp_path / "out", progress=False)
    groups = len(dirs) + 1
    assert peak[0] <= 2 * groups < len(base)  # this group + the one read ahead, never a whole model


def test_yaml_file_with_relative_paths(models, tmp_path, monkeypatch):
    base_dir, dirs, _, _ = models
    (tmp_path / "merge.yaml").write_text(
        "merge_method: ties\nbase_model: base\nmodels:\n"
        + "".join(f"  - model: {d.name}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for d in dirs)
        + "parameters:\n  normalize: true\n  int8_mask: true\n")
    monkeypatch.chdir("/")
    config = load_config(tmp_path / "merge.yaml")
    assert config.base_model == base_dir and config.models[0].path == dirs[0]
    assert config.parameters == {"normalize": True, "int8_mask": True}


def test_transformers_loads_the_merged_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "tuned", max_shard_size="20KB")
    raw = {"merge_method": "ties", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "tuned"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    out = run_merge(config_from_dict(raw), tmp_path / "merged", shard_bytes=30_000, progress=False).out_dir
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    merged = load_folder(out)
    for name, value in loaded.state_dict().items():
        if name in merged:
            assert torch.equal(value, merged[name])


def test_save_checkpoint_helper_round_trips(tmp_path):
    state = tiny_state(3)
    folder = save_checkpoint(state, tmp_path / "c", shards=3)
    checkpoint = Checkpoint(folder)
    assert set(checkpoint.tensors) == set(state)
    for name, value in state.items():
        assert torch.equal(checkpoint.read(name), value)
    checkpoint.close()

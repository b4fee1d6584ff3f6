"""passthrough and the `slices:` form (layer stacking, depth up-scaling): renumbered layers, config.json, a
transformers forward equal to a hand-stacked model's, bit-identity with committed mergekit 0.1.5 outputs
(fixtures/passthrough/, made by its make_golden.py), bounded memory, and the refusals."""
from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltatune.cli import main
from deltatune.errors import ConfigError, MergeError
from deltatune.merging import config_from_dict, load_config, merge_state_dicts, run_merge
from deltatune.merging.io.checkpoint import Checkpoint, ShardWriter
from deltatune.merging.io.slices import layer_layout
from deltatune.merging.methods.passthrough import PassthroughModelParams
from merging.tiny_checkpoints import load_folder, make_models

transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures" / "passthrough"
LAYER_TAILS = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def _llama(folder: Path, seed: int, layers: int = 4, intermediate: int = 12):
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(folder, max_shard_size="6KB")  # sharded: the slices cross shard files
    return model


@pytest.fixture
def llama(tmp_path):
    return tmp_path / "a", _llama(tmp_path / "a", 0)


def _stack(source: Path, ranges, method="passthrough", **extra) -> dict:
    return {"merge_method": method, **extra,
            "slices": [{"sources": [{"model": str(source), "layer_range": list(r)}]} for r in ranges]}


def _merge(raw: dict, out: Path, **options):
    return run_merge(config_from_dict(raw, None, yaml.safe_dump(raw)), out, progress=False, **options)


def test_stacking_0_3_and_1_4_renumbers_the_source_layers(llama, tmp_path):
    folder, _ = llama
    _merge(_stack(folder, [(0, 3), (1, 4)]), tmp_path / "out")
    source, merged = load_folder(folder), load_folder(tmp_path / "out")
    expected = {name: source[name] for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    for out_layer, source_layer in enumerate([0, 1, 2, 1, 2, 3]):
        for tail in LAYER_TAILS:
            expected[f"model.layers.{out_layer}.{tail}"] = source[f"model.layers.{source_layer}.{tail}"]
    assert set(merged) == set(expected)
    for name, value in expected.items():
        assert merged[name].dtype == value.dtype and torch.equal(merged[name], value), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4  # the input is untouched


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranges=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)).filter(lambda r: r[0] < r[1]),
                       min_size=1, max_size=4),
       picks=st.lists(st.integers(0, 1), min_size=4, max_size=4))
def test_any_stack_of_ranges_is_the_concatenation_of_its_source_layers(tmp_path_factory, ranges, picks):
    root = tmp_path_factory.mktemp("stack")
    _, dirs, _, states = make_models(root, count=2)
    raw = {"merge_method": "passthrough", "slices": [{"sources": [_source(dirs[pick], start, end)]}
                                                     for (start, end), pick in zip(ranges, picks)]}
    _merge(raw, root / "out", shard_bytes=300)
    merged = load_folder(root / "out")
    order = [(pick, layer) for (start, end), pick in zip(ranges, picks) for layer in range(start, end)]
    expected = {"model.embed_tokens.weight": states[picks[0]]["model.embed_tokens.weight"],
                "model.norm.weight": states[picks[len(ranges) - 1]]["model.norm.weight"],
                "model.rotary.step": states[0]["model.rotary.step"]}
    for out_layer, (pick, layer) in enumerate(order):
        for tail in ("mlp.up_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
            expected[f"model.layers.{out_layer}.{tail}"] = states[pick][f"model.layers.{layer}.{tail}"]
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[name], value) for name, value in expected.items())
    assert json.loads((root / "out" / "config.json").read_text())["num_hidden_layers"] == len(order)


def test_the_stacked_model_runs_like_a_hand_stacked_one(llama, tmp_path):
    folder, model = llama
    _merge(_stack(folder, [(0, 3), (1, 4)]), tmp_path / "out", shard_bytes=5_000)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_hidden_layers == 6 and len(loaded.model.layers) == 6

    config = transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 6})
    by_hand = transformers.LlamaForCausalLM(config).eval()
    by_hand.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    by_hand.model.norm.load_state_dict(model.model.norm.state_dict())
    by_hand.lm_head.load_state_dict(model.lm_head.state_dict())
    for out_layer, source_layer in enumerate([0, 1, 2, 1, 2, 3]):
        by_hand.model.layers[out_layer].load_state_dict(model.model.layers[source_layer].state_dict())
    tokens = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = loaded(tokens, use_cache=False).logits
        reference = by_hand(tokens, use_cache=False).logits
    assert torch.equal(ours, reference)
    assert not torch.allclose(ours, model.eval()(tokens, use_cache=False).logits)  # 6 layers, not the source's 4


GOLDEN = ["stack_0_3_1_4", "two_models_scaled", "linear_slices"]


@pytest.mark.parametrize("name", GOLDEN)
def test_bit_identical_with_mergekit(name, tmp_path):
    """mergekit-yaml 0.1.5 ran these configs on these inputs (fixtures/passthrough/make_golden.py)."""
    run_merge(load_config(FIXTURES / "configs" / f"{name}.yaml"), tmp_path / "out", progress=False)
    ours, golden = load_folder(tmp_path / "out"), load_folder(FIXTURES / "golden" / name)
    assert set(ours) == set(golden)
    for key, value in golden.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    ours_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert ours_config == json.loads((FIXTURES / "golden" / name / "config.json").read_text())


def test_slerp_over_slices_matches_mergekit_to_float32_rounding(tmp_path):
    """Slice routing, a per-slice `t` gradient and the top-level fallback agree with mergekit; the values differ
    by a few float32 ulps because mergekit 0.1.5's slerp is computed in chunked torch arithmetic while
    methods/slerp.py reproduces the older NumPy arithmetic (a wrong t or layer would differ by ~1e-2)."""
    run_merge(load_config(FIXTURES / "configs" / "slerp_slices.yaml"), tmp_path / "out", progress=False)
    ours, golden = load_folder(tmp_path / "out"), load_folder(FIXTURES / "golden" / "slerp_slices")
    assert set(ours) == set(golden)
    for key, value in golden.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_gradients_run_over_each_slice_and_non_layer_tensors_come_from_the_first_and_last_slice(tmp_path):
    a, b = load_folder(FIXTURES / "inputs" / "a"), load_folder(FIXTURES / "inputs" / "b")
    run_merge(load_config(FIXTURES / "configs" / "two_models_scaled.yaml"), tmp_path / "out", progress=False)
    merged = load_folder(tmp_path / "out")
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    for out_layer, (source, layer, mlp_scale) in enumerate([(a, 0, None), (a, 1, None), (b, 1, 1.0), (b, 2, 0.75),
                                                             (b, 3, 0.5)]):
        for tail in LAYER_TAILS:
            value = source[f"model.layers.{layer}.{tail}"]
            if mlp_scale is not None and "mlp" in tail:  # scale: [1, 0.5] over t = 0, 1/2, 1
                expected = (value.double() * mlp_scale).float()
            elif mlp_scale is not None:
                expected = value * 1.0
            else:
                expected = value
            assert torch.equal(merged[f"model.layers.{out_layer}.{tail}"], expected), (out_layer, tail)


def test_passthrough_with_models_copies_the_model_and_scale_multiplies():
    tensor = torch.randn(3, 4)
    copied = merge_state_dicts("passthrough", None, [{"w": tensor}])["w"]
    assert torch.equal(copied, tensor) and copied.data_ptr() != tensor.data_ptr()  # never aliases the input
    scaled = merge_state_dicts("passthrough", None, [{"w": tensor}], None, [PassthroughModelParams(scale=0.25)])
    assert torch.equal(scaled["w"], tensor * 0.25)


def test_memory_holds_a_few_tensors_not_whole_models(llama, tmp_path, monkeypatch):
    folder, _ = llama
    alive, peak, reads = [0], [0], [0]
    original = Checkpoint.read

    def counting_read(self, name, dtype=None):
        tensor = original(self, name, dtype)
        alive[0] += 1
        reads[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    report = _merge(_stack(folder, [(0, 4), (0, 4), (2, 4)]), tmp_path / "out")
    assert report.tensors == 3 + 10 * len(LAYER_TAILS)
    assert reads[0] == report.tensors and peak[0] <= 2  # one tensor, plus the one read ahead


def test_a_failure_while_writing_leaves_no_output(llama, tmp_path, monkeypatch):
    folder, _ = llama
    original, written = ShardWriter.write, []

    def failing_write(self, name, tensor):
        if len(written) == 5:
            raise OSError(28, "No space left on device")
        written.append(name)
        original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    with pytest.raises(Exception, match="No space left"):
        _merge(_stack(folder, [(0, 3), (1, 4)]), tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_cli_merges_a_slices_yaml_with_relative_paths(tmp_path, capsys):
    shutil.copytree(FIXTURES / "inputs", tmp_path / "inputs")
    (tmp_path / "configs").mkdir()
    config = shutil.copy(FIXTURES / "configs" / "stack_0_3_1_4.yaml", tmp_path / "configs" / "stack.yaml")
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "merged 57 tensors" in capsys.readouterr().out
    assert (tmp_path / "out" / "deltatune_merge.yml").read_text() == Path(config).read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_layer_types_follow_the_layers(llama, tmp_path):
    folder, _ = llama
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    (folder / "config.json").write_text(json.dumps(config))
    _merge(_stack(folder, [(0, 3), (1, 4)]), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == [config["layer_types"][i] for i in (0, 1, 2, 1, 2, 3)]


def _source(path, start, end, **parameters) -> dict:
    return {"model": str(path), "layer_range": [start, end], **({"parameters": parameters} if parameters else {})}


@pytest.mark.parametrize("slices,match", [
    ([{"sources": [{"model": "a", "layer_range": [2, 2]}]}], r"slices\[0\].sources\[0\].layer_range=\[2, 2\]"),
    ([{"sources": [{"model": "a", "layer_range": [-1, 2]}]}], "0 <= start < end"),
    ([{"sources": [{"model": "a", "layer_range": [0]}]}], "two integers"),
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}],
     r"slices\[0\]: its sources have \[2, 3\] layers"),
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "a", "layer_range": [2, 4]}]}],
     "already a source of this slice"),
    ([{"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.5}], "unknown key 'residual_weight'"),
    ([{"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"scael": 1}}]}], "unknown parameter 'scael'"),
    ([{"sources": [{"model": "a"}]}], "expected {model: path, layer_range"),
    ([], "non-empty list"),
])
def test_bad_slices_are_refused_by_name(slices, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"merge_method": "passthrough", "slices": slices})


def test_models_and_slices_together_are_refused():
    with pytest.raises(ConfigError, match="exactly one of models: .* or slices:"):
        config_from_dict({"merge_method": "passthrough", "models": ["a"],
                          "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]})


def test_refusals_before_any_tensor_is_read(llama, tmp_path, monkeypatch):
    folder, _ = llama
    other = tmp_path / "wide"
    _llama(other, 1, intermediate=20)
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("a tensor was read"))
    cases = [
        (_stack(folder, [(0, 3), (2, 5)]),
         r"slices\[1\].sources\[0\].layer_range=\[2, 5\] is out of bounds: .* has 4 layers .* at most 4"),
        (_stack(tmp_path / "missing", [(0, 1)]), "does not exist"),
        ({"merge_method": "passthrough", "slices": [{"sources": [_source(folder, 0, 2), _source(other, 0, 2)]}]},
         "passthrough copies exactly one model per tensor, got 2"),
        ({"merge_method": "passthrough", "slices": [{"sources": [_source(folder, 0, 2)]},
                                                    {"sources": [_source(other, 0, 2)]}]},
         r"slices\[1\]: tensor 'model.layers.0.mlp.\w+_proj.weight' of .* has shape \((8, 20|20, 8)\), the first"),
    ]
    for raw, match in cases:
        with pytest.raises(MergeError, match=match):
            _merge(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mixed_dtypes_need_a_dtype_and_out_dtype_applies(llama, tmp_path):
    folder, model = llama
    model.to(torch.bfloat16).save_pretrained(tmp_path / "half")
    raw = {"merge_method": "passthrough", "slices": [{"sources": [_source(folder, 0, 2)]},
                                                     {"sources": [_source(tmp_path / "half", 2, 4)]}]}
    with pytest.raises(MergeError, match="stored in bfloat16 and float32; set dtype:"):
        _merge(raw, tmp_path / "out")
    _merge({**raw, "dtype": "float32", "out_dtype": "bfloat16"}, tmp_path / "out")
    merged, source = load_folder(tmp_path / "out"), load_folder(folder)
    assert {value.dtype for value in merged.values()} == {torch.bfloat16}
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                       source["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_base_must_be_one_of_the_slice_sources(tmp_path):
    base_dir, dirs, _, _ = make_models(tmp_path, count=2)
    raw = {"merge_method": "slerp", "base_model": str(base_dir), "parameters": {"t": 0.5},
           "slices": [{"sources": [_source(dirs[0], 0, 3), _source(dirs[1], 0, 3)]}]}
    with pytest.raises(MergeError, match=r"slices\[0\]: base_model .*base is not one of this slice's sources"):
        _merge(raw, tmp_path / "out")
    raw["slices"][0]["base_model"] = str(dirs[0])  # a per-slice base
    _merge(raw, tmp_path / "out")
    del raw["slices"][0]["base_model"], raw["base_model"]
    with pytest.raises(MergeError, match="merge_method slerp needs a base_model"):
        _merge(raw, tmp_path / "out2")


def test_whole_model_statistics_are_refused_with_slices(tmp_path):
    base_dir, dirs, _, _ = make_models(tmp_path, count=1)
    raw = {"merge_method": "ties", "base_model": str(base_dir), "semantics": "paper",
           "slices": [{"sources": [_source(base_dir, 0, 3), _source(dirs[0], 0, 3, weight=1.0, density=0.5)]}]}
    with pytest.raises(MergeError, match="whole-model statistics"):
        _merge(raw, tmp_path / "out")
    raw["parameters"] = {"trim_scope": "tensor"}
    _merge(raw, tmp_path / "out")


def test_slices_with_a_task_vector_method_equal_the_models_form_over_all_layers(tmp_path):
    base_dir, dirs, _, _ = make_models(tmp_path, count=2)
    parameters = [{"weight": 0.6, "density": 0.5}, {"weight": [0.2, 1.0], "density": 0.7}]
    whole = {"merge_method": "ties", "base_model": str(base_dir),
             "models": [{"model": str(d), "parameters": p} for d, p in zip(dirs, parameters)]}
    sliced = {"merge_method": "ties", "base_model": str(base_dir),
              "slices": [{"sources": [_source(base_dir, 0, 3)]
                          + [_source(d, 0, 3, **p) for d, p in zip(dirs, parameters)]}]}
    _merge(whole, tmp_path / "whole")
    _merge(sliced, tmp_path / "sliced")
    whole_tensors, sliced_tensors = load_folder(tmp_path / "whole"), load_folder(tmp_path / "sliced")
    assert set(whole_tensors) == set(sliced_tensors)
    for key, value in whole_tensors.items():
        assert torch.equal(sliced_tensors[key], value), key


def test_layer_layout_refuses_two_stacks_and_gaps(tmp_path):
    from safetensors.torch import save_file

    save_file({"gpt_neox.embed_in.weight": torch.ones(1), "gpt_neox.layers.0.w": torch.ones(1),
               "gpt_neox.final_layer_norm.weight": torch.ones(1), "embed_out.weight": torch.ones(1)},
              str(tmp_path / "neox.safetensors"))
    layout = layer_layout(Checkpoint(tmp_path / "neox.safetensors"))
    assert layout.before == ["gpt_neox.embed_in.weight"] and layout.stack == "gpt_neox.layers."
    assert sorted(layout.after) == ["embed_out.weight", "gpt_neox.final_layer_norm.weight"]

    save_file({"encoder.layers.0.w": torch.ones(1), "decoder.layers.0.w": torch.ones(1)},
              str(tmp_path / "x.safetensors"))
    with pytest.raises(MergeError, match="2 stacks of numbered layers"):
        layer_layout(Checkpoint(tmp_path / "x.safetensors"))
    save_file({"model.layers.0.w": torch.ones(1), "model.layers.2.w": torch.ones(1)},
              str(tmp_path / "y.safetensors"))
    with pytest.raises(MergeError, match="layer 1 of model.layers.0..2 has no tensors"):
        layer_layout(Checkpoint(tmp_path / "y.safetensors"))

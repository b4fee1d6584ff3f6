"""`deltatune merge` and `deltatune prune` through the main CLI."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.merging.cli import parse_size
from merging.tiny_checkpoints import load_folder, make_models


@pytest.fixture
def models(tmp_path):
    return make_models(tmp_path, count=2)


def test_merge_command_writes_the_folder(models, tmp_path, capsys):
    base_dir, dirs, base, tuned = models
    config = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "parameters": {"lambda": 0.5},
              "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs]}
    (tmp_path / "ta.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "ta.yaml"), "--out", str(tmp_path / "out"), "--no-progress",
                 "--shard-size", "1KB"]) == 0
    assert "merged 12 tensors" in capsys.readouterr().out
    merged = load_folder(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], base[name] + 0.5 * sum(t[name] - base[name] for t in tuned))
    assert len(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]) == 12


def test_merge_lists_methods_and_has_help(capsys):
    assert main(["merge", "--list-methods"]) == 0
    out = capsys.readouterr().out
    assert "ties" in out and "pcb" in out and "darex" in out
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "merge_method: ties" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "--drop-rate" in capsys.readouterr().out
    assert main(["merge"]) == 2 and "--out" in capsys.readouterr().err


def _delta(out, base_dir, name):
    return load_folder(out)[name] - load_folder(base_dir)[name]


def test_prune_dare_darex_and_magnitude(models, tmp_path):
    base_dir, dirs, base, tuned = models
    name = "model.layers.1.mlp.up_proj.weight"
    full = tuned[0][name] - base[name]
    common = [str(dirs[0]), "--base", str(base_dir), "--no-progress"]
    assert main(["prune", *common, "--out", str(tmp_path / "dare"), "--drop-rate", "0.5", "--seed", "3"]) == 0
    dare = _delta(tmp_path / "dare", base_dir, name)
    kept = dare != 0
    torch.testing.assert_close(dare[kept], full[kept] * 2)
    assert main(["prune", *common, "--out", str(tmp_path / "darex"), "--method", "darex", "--drop-rate", "0.5",
                 "--q", "0.8", "--seed", "3"]) == 0
    darex = _delta(tmp_path / "darex", base_dir, name)
    assert torch.equal(darex != 0, kept)  # same seed, same drop mask
    torch.testing.assert_close(darex[kept], full[kept] / 0.8)
    (tmp_path / "q.json").write_text(json.dumps({name: 0.5}))
    assert main(["prune", *common, "--out", str(tmp_path / "qmap"), "--method", "darex", "--drop-rate", "0.5",
                 "--q-map", str(tmp_path / "q.json"), "--q", "1.0", "--seed", "3"]) == 0
    torch.testing.assert_close(_delta(tmp_path / "qmap", base_dir, name)[kept], full[kept] / 0.5)
    other = "model.layers.2.mlp.up_proj.weight"
    other_delta = _delta(tmp_path / "qmap", base_dir, other)
    torch.testing.assert_close(other_delta[other_delta != 0], (tuned[0][other] - base[other])[other_delta != 0])
    assert main(["prune", *common, "--out", str(tmp_path / "mag"), "--method", "magnitude", "--drop-rate", "0.75"]) == 0
    magnitude = _delta(tmp_path / "mag", base_dir, name)
    assert int((magnitude != 0).sum()) == full.numel() // 4
    assert magnitude.abs().max() == full.abs().max()


def test_prune_keeps_heads_whole(models, tmp_path):
    base_dir, dirs, base, tuned = models
    name = "model.embed_tokens.weight"
    assert main(["prune", str(dirs[0]), "--base", str(base_dir), "--out", str(tmp_path / "p"), "--drop-rate", "0.9",
                 "--keep", "embed_tokens", "--no-progress"]) == 0
    torch.testing.assert_close(load_folder(tmp_path / "p")[name], tuned[0][name])


@pytest.mark.parametrize("argv,match", [
    (["--drop-rate", "1.0"], "--drop-rate 1.0"),
    (["--q", "0.5"], "only apply to --method darex"),
    (["--method", "darex", "--q", "2"], "q=2.0"),
    (["--shard-size", "lots"], "--shard-size 'lots'"),
])
def test_prune_errors_are_one_line(models, tmp_path, capsys, argv, match):
    base_dir, dirs, _, _ = models
    assert main(["prune", str(dirs[0]), "--base", str(base_dir), "--out", str(tmp_path / "p"), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500mb") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1234") == 1234 and parse_size("1e3") == 1000
    with pytest.raises(ConfigError):
        parse_size("0")

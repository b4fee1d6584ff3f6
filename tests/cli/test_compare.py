"""`deltatune compare`: methods x seeds through the recipe, one table, resumable, bad input refused up front."""
from __future__ import annotations

import json
import statistics

import pytest

import deltatune.recipe
from deltatune.cli import main
from deltatune.compare import RUNS_FILE, TABLE_FILE, compare
from deltatune.errors import ConfigError

LORA_ON_CONV = {"lora": {"targets": ("conv1", "conv2"), "rank": 2}}
QUICK = dict(max_steps=3, batch_size=16, epochs=1)


def _compare(out, seeds=(0, 1), **overrides):
    settings = {**QUICK, **overrides}
    return compare("digits", ["probe", "lora"], LORA_ON_CONV, list(seeds), out_dir=out, lr={"lora": 1e-2},
                   **settings)


def test_every_method_and_seed_runs_once_and_the_table_holds_their_means(tmp_path, monkeypatch):
    summaries = _compare(tmp_path)
    runs = [json.loads(line) for line in (tmp_path / RUNS_FILE).read_text().splitlines()]
    assert sorted((r["settings"]["method"], r["settings"]["seed"]) for r in runs) == [
        ("lora", 0), ("lora", 1), ("probe", 0), ("probe", 1)]
    by_method = {s.method: s for s in summaries}
    lora_tests = [r["test"] for r in runs if r["settings"]["method"] == "lora"]
    assert by_method["lora"].test_mean == pytest.approx(statistics.mean(lora_tests))
    assert by_method["lora"].trainable > by_method["probe"].trainable  # the head, plus the LoRA factors
    table = (tmp_path / TABLE_FILE).read_text()
    assert "| lora |" in table and "| probe |" in table

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(deltatune.recipe, "finetune", no_training)
    again = _compare(tmp_path)  # resumes: nothing left to train
    assert [s.test for s in again] == [s.test for s in summaries]


def test_a_changed_setting_is_a_new_run(tmp_path):
    _compare(tmp_path, seeds=(0,))
    _compare(tmp_path, seeds=(0,), max_steps=4)
    runs = (tmp_path / RUNS_FILE).read_text().splitlines()
    assert len(runs) == 4
    assert len(list(tmp_path.glob("lora-seed0-*"))) == 2  # each setting keeps its own adapter folder


@pytest.mark.parametrize("methods, params, match", [
    ([], {}, "no methods to compare"),
    (["lora", "lora"], {}, "'lora' is listed twice"),
    (["lorra"], {}, "unknown method 'lorra'"),
    (["lora"], {"lora": {"rank": 0}}, "rank=0"),
    (["lora"], {"sara": {"fraction": 0.1}}, "'sara', which is not compared"),
    (["probe"], {"probe": {"rank": 2}}, "probe takes no hyper-parameters"),
])
def test_bad_requests_are_refused_before_anything_runs_or_is_written(tmp_path, methods, params, match):
    with pytest.raises(ConfigError, match=match):
        compare("digits", methods, params, [0], out_dir=tmp_path / "out", **QUICK)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_runs_file_is_named(tmp_path):
    (tmp_path / RUNS_FILE).write_text('{"settings": {}}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        _compare(tmp_path)


def test_cli_prints_the_table_and_refuses_bad_flags_in_one_line(tmp_path, capsys):
    argv = ["compare", "probe", "--task", "digits", "--seeds", "0", "--max-steps", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "| probe |" in capsys.readouterr().out
    for bad, message in ((["-p", "rank=2"], "expected METHOD:KEY=VALUE"), (["--lr", "probe=fast"], "not a number"),
                         (["--seeds", "a,b"], "expected integers")):
        assert main(argv + bad) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_runs_file_written_before_the_harness_is_reused_as_it_is(tmp_path, monkeypatch):
    from deltatune.compare import run_settings

    settings = run_settings("digits", "probe", {}, 0, None, QUICK)
    line = {"settings": settings, "test": 0.25, "validation": 0.5, "trainable": 650, "share": 0.01, "seconds": 1.5}
    (tmp_path / RUNS_FILE).write_text(json.dumps(line) + "\n")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(deltatune.recipe, "finetune", no_training)
    [summary] = compare("digits", ["probe"], {}, [0], out_dir=tmp_path, **QUICK)
    assert (summary.test, summary.trainable) == ([0.25], 650)
    assert "| probe | 650 | 1.000% | 25.0 | 50.0 | 1.5 |" in (tmp_path / TABLE_FILE).read_text()

"""The benchmark harness: grid, resumable run log, child runs, environment, mean ± std, atomic reports."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from deltatune.bench import harness
from deltatune.bench.harness import RunLog, environment, job_grid, mean_std, run_child, run_jobs, write_report
from deltatune.errors import BenchmarkError, ConfigError


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_grid_is_every_combination_with_the_last_axis_fastest():
    assert job_grid(method=("lora", "sara"), seed=(0, 1)) == [
        {"method": "lora", "seed": 0}, {"method": "lora", "seed": 1},
        {"method": "sara", "seed": 0}, {"method": "sara", "seed": 1}]


def test_a_rerun_skips_exactly_the_finished_jobs(tmp_path):
    log = RunLog(tmp_path / "runs.jsonl", identity=("method", "seed"))
    jobs = job_grid(method=("lora", "sara"), seed=(0, 1))
    log.append({"method": "lora", "seed": 1, "test": 0.5})
    log.append({"method": "sara", "seed": 0, "test": 0.6})
    ran = []

    def run(job):
        ran.append(dict(job))
        return {**job, "test": 0.7}

    new = run_jobs(jobs, log, run)
    assert ran == [{"method": "lora", "seed": 0}, {"method": "sara", "seed": 1}]
    assert new == [{"method": "lora", "seed": 0, "test": 0.7}, {"method": "sara", "seed": 1, "test": 0.7}]
    assert [(r["method"], r["seed"]) for r in _lines(log.path)] == [("lora", 1), ("sara", 0), ("lora", 0),
                                                                       ("sara", 1)]
    ran.clear()
    assert run_jobs(jobs, log, run) == [] and ran == []  # everything finished: nothing runs again
    assert log.find({"method": "sara", "seed": 0})["test"] == 0.6


def test_identity_is_the_given_keys_only_and_a_record_without_them_matches_nothing(tmp_path):
    log = RunLog(tmp_path / "runs.jsonl", identity=("method", "lr"))
    log.append({"method": "lora", "lr": 0.001, "seconds": 3.0, "extra": [1, 2]})
    log.append({"note": "written by an older version"})
    assert log.pending([{"method": "lora", "lr": 0.001, "test": True}]) == []
    assert log.pending([{"method": "lora", "lr": 0.003}]) == [{"method": "lora", "lr": 0.003}]
    assert log.identity({"note": "x"}) is None
    with pytest.raises(ConfigError, match="lacks the keys that identify a run"):
        log.pending([{"method": "lora"}])


def test_a_function_can_be_the_identity_and_repeated_jobs_run_once(tmp_path):
    log = RunLog(tmp_path / "runs.jsonl", identity=lambda d: d.get("settings"))
    job = {"settings": {"method": "lora", "seed": 0}}
    log.append({"settings": {"seed": 0, "method": "lora"}, "test": 0.9})  # key order does not matter
    assert log.pending([job, {"settings": {"method": "lora", "seed": 1}}] * 2) == [
        {"settings": {"method": "lora", "seed": 1}}]


def test_a_torn_last_line_is_named_dropped_and_its_run_runs_again(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"method": "lora", "seed": 0, "test": 0.5}\n{"method": "lora", "se')  # crash mid-append
    log = RunLog(path, identity=("method", "seed"))
    with pytest.warns(UserWarning, match=r"runs.jsonl ends in a torn line 2 .* will run again"):
        assert log.records() == [{"method": "lora", "seed": 0, "test": 0.5}]
    with pytest.warns(UserWarning, match="torn line"):
        new = run_jobs(job_grid(method=("lora",), seed=(0, 1)), log, lambda job: {**job, "test": 0.8})
    assert new == [{"method": "lora", "seed": 1, "test": 0.8}]
    assert path.read_text() == ('{"method": "lora", "seed": 0, "test": 0.5}\n'
                                '{"method": "lora", "seed": 1, "test": 0.8}\n')  # the fragment is gone


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"method": "lora", "seed": 0}')
    log = RunLog(path, identity=("method", "seed"))
    assert log.pending([{"method": "lora", "seed": 0}]) == []
    log.append({"method": "lora", "seed": 1})
    assert _lines(path) == [{"method": "lora", "seed": 0}, {"method": "lora", "seed": 1}]


def test_a_corrupt_line_before_the_end_stops_with_its_number(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"seed": 0}\nnot json\n{"seed": 1}\n')
    with pytest.raises(ConfigError, match=r"runs.jsonl line 2 is not JSON; delete that line"):
        RunLog(path, identity=("seed",)).records()


def test_a_failing_child_raises_with_its_exit_code_and_the_tail_of_its_stderr():
    code = "import sys; sys.stderr.write('noise ' * 2000 + 'ZeroDivisionError: the cause'); sys.exit(3)"
    with pytest.raises(BenchmarkError) as caught:
        run_child([sys.executable, "-c", code], label="run lora/0")
    message = str(caught.value)
    assert message.startswith("run lora/0 failed with exit code 3; the end of its stderr:\n")
    assert message.endswith("ZeroDivisionError: the cause")
    assert len(message) < harness.STDERR_TAIL + 200  # the tail, not the whole log


def test_a_child_result_is_its_last_json_line_and_a_missing_one_is_refused():
    code = "import json; print('loading...'); print(json.dumps({'test': 0.25}))"
    assert run_child([sys.executable, "-c", code]) == {"test": 0.25}
    with pytest.raises(BenchmarkError, match="printed no JSON object as its last stdout line"):
        run_child([sys.executable, "-c", "print('{\"test\": 1}'); print('done')"])
    with pytest.raises(BenchmarkError, match="printed nothing"):
        run_child([sys.executable, "-c", "pass"])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_run_does_not_lose_the_others_and_is_raised(tmp_path, workers):
    log = RunLog(tmp_path / "runs.jsonl", identity=("seed",))

    def run(job):
        if job["seed"] == 1:
            raise BenchmarkError("seed 1 failed")
        return {**job, "test": 1.0}

    with pytest.raises(BenchmarkError, match="seed 1 failed"):
        run_jobs(job_grid(seed=(0, 1, 2)), log, run, workers=workers)
    assert sorted(r["seed"] for r in log.records()) == [0, 2]


def test_a_record_without_its_jobs_identity_is_refused_not_logged(tmp_path):
    log = RunLog(tmp_path / "runs.jsonl", identity=("method", "seed"))
    with pytest.raises(BenchmarkError, match="does not carry its identity"):
        run_jobs([{"method": "lora", "seed": 0}], log, lambda job: {"test": 0.5})
    assert log.records() == []


@pytest.mark.parametrize("values, kwargs, expected", [
    ([0.8512], {}, "85.1"),  # one value: the value alone, no ± 0.0
    ([0.5, 0.7], {}, "60.0 ± 14.1"),
    ([0.123, 0.125], {"scale": 1, "digits": 3}, "0.124 ± 0.001"),
    ([], {}, "–"),
    ([], {"empty": ""}, ""),
])
def test_mean_std(values, kwargs, expected):
    assert mean_std(values, **kwargs) == expected


def _crashing_savefig(buffer, **kwargs):
    buffer.write(b"\x89PNG partial")
    raise RuntimeError("the renderer crashed")


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    plt = harness.pyplot()
    table, plot = tmp_path / "results.md", tmp_path / "results.png"
    figure = plt.figure()
    write_report(table, "| a |\n", {plot: figure})
    assert table.read_text() == "| a |\n" and plot.read_bytes().startswith(b"\x89PNG\r\n")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    crashing = plt.figure()
    crashing.savefig = _crashing_savefig
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_report(table, "| b |\n", {plot: crashing})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old table and plot, no scraps


def test_an_interrupted_table_write_leaves_the_old_table(tmp_path, monkeypatch):
    table = tmp_path / "results.md"
    table.write_text("old\n")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(table, "new\n")
    assert table.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_the_environment_names_every_field(monkeypatch):
    import torch

    monkeypatch.setattr(sys, "argv", [str(Path.cwd() / "benchmarks" / "x.py"), "--seeds", "0 1"])
    env = environment(threads=3)
    assert set(env) == {"date", "torch", "python", "cores", "threads", "commit", "command"}
    assert env["torch"] == torch.__version__ and env["threads"] == 3 and env["cores"] == os.cpu_count()
    assert env["command"] == "python benchmarks/x.py --seeds '0 1'"  # relative, and quoted as typed
    assert env["commit"] != "" and len(env["date"]) == len("2026-12-02 10:00")
    line = harness.environment_line(env)
    for field in ("torch", "python", "threads", "commit"):
        assert str(env[field]) in line


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path):
    assert harness.git_commit(tmp_path) == "unknown"


def test_kept_notes_returns_the_hand_written_reading_section_or_nothing(tmp_path):
    report = tmp_path / "r.md"
    assert harness.kept_notes(report) == ""  # no report yet
    report.write_text("# Table\n\n| a |\n", encoding="utf-8")
    assert harness.kept_notes(report) == ""
    report.write_text("# Table\n\n| a |\n\n## Reading notes\n\nLoRA wins.\n", encoding="utf-8")
    assert harness.kept_notes(report) == "\n## Reading notes\n\nLoRA wins.\n"


def test_a_regenerated_report_keeps_the_hand_written_reading_unless_it_brings_its_own(tmp_path):
    report = tmp_path / "r.md"
    report.write_text("# Table\n\n| old |\n\n## Reading\n\nLoRA wins.\n", encoding="utf-8")
    write_report(report, "# Table\n\n| new |\n")
    assert report.read_text(encoding="utf-8") == "# Table\n\n| new |\n\n## Reading\n\nLoRA wins.\n"
    write_report(report, "# Table\n\n| newer |\n\n## Reading\n\nSSF wins.\n")  # its own reading replaces the old
    assert report.read_text(encoding="utf-8").endswith("SSF wins.\n") and "LoRA" not in report.read_text()
    write_report(report, "# Table\n", keep_reading=False)
    assert report.read_text(encoding="utf-8") == "# Table\n"

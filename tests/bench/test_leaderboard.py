"""The leaderboard's report from a fake run log: ratios to LoRA, ranks, missing cells and methods shown."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "leaderboard.py"
TASKS = ["digits", "wordnet-nouns"]
METHODS = ["bitfit", "lora", "sara", "spt"]


@pytest.fixture(scope="module")
def board():
    spec = importlib.util.spec_from_file_location("leaderboard_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cell(task, method, budget, tests, *, trainable=1000, step=1.0, memory=100.0, count=None, lr=0.01):
    runs = [{"lr": lr, "seed": s, "validation": t, "test": t, "trainable": trainable, "seconds": 1.0}
            for s, t in enumerate(tests)]
    runs += [{"lr": other, "seed": 0, "validation": 0.0, "test": 0.99, "trainable": trainable, "seconds": 1.0}
             for other in (lr / 3, lr * 3)]  # the tuning neighbours: the chosen rate lies inside them
    match = {"field": "rank", "value": 8, "count": count or trainable, "target": 1000, "matched": True}
    return {"task": task, "method": method, "budget": budget, "params": {}, "match": match, "lr": lr, "runs": runs,
            "step_seconds": step, "peak_rss_mb": memory}


@pytest.fixture
def records():
    return [
        cell("digits", "lora", "lora-r8", [0.78, 0.80, 0.82], step=1.0, memory=100.0, trainable=1000),
        cell("wordnet-nouns", "lora", "lora-r8", [0.60, 0.60, 0.60], step=2.0, memory=200.0, trainable=1000),
        cell("digits", "sara", "lora-r8", [0.90, 0.90, 0.90], step=2.0, memory=150.0, trainable=1000),
        cell("wordnet-nouns", "sara", "lora-r8", [0.50, 0.52, 0.54], step=8.0, memory=300.0, trainable=1100),
        cell("digits", "spt", "lora-r8", [0.99, 0.99, 0.99], count=5000),  # an older run beyond reach: ignored
        cell("digits", "lora", "lora-r1", [0.70, 0.70, 0.70]),
        cell("digits", "bitfit", "natural", [0.30, 0.30, 0.30], trainable=500, step=0.5, memory=50.0),
    ]


def row_of(rows, method):
    return next(r for r in rows if r["method"] == method)


def test_ratios_are_geometric_means_of_per_task_ratios_to_lora(board, records):
    rows = board.leaderboard_rows(records, TASKS, METHODS, "lora-r8")
    sara = row_of(rows, "sara")
    assert sara["step"] == pytest.approx(math.sqrt(2.0 * 4.0))  # 2/1 on digits, 8/2 on nouns
    assert sara["memory"] == pytest.approx(1.5)
    assert sara["trainable"] == pytest.approx(math.sqrt(1.0 * 1.1))
    assert row_of(rows, "lora")["step"] == pytest.approx(1.0)
    assert not sara["matched"] and row_of(rows, "lora")["matched"]


def test_only_the_chosen_lr_enters_the_accuracy(board, records):
    rows = board.leaderboard_rows(records, TASKS, METHODS, "lora-r8")
    assert row_of(rows, "lora")["tasks"]["digits"] == [0.78, 0.80, 0.82]  # not the 0.99 of the other lr
    assert row_of(rows, "sara")["mean"] == pytest.approx((0.90 + 0.52) / 2)


def test_rows_are_ranked_by_mean_accuracy_with_missing_methods_last(board, records):
    rows = board.leaderboard_rows(records, TASKS, METHODS, "lora-r8")
    assert [r["method"] for r in rows] == ["sara", "lora", "spt"]  # spt never ran in reach: shown, not dropped
    assert row_of(rows, "spt")["mean"] is None and row_of(rows, "spt")["unreachable"]
    assert row_of(rows, "spt")["status"] == {"digits": "unreachable (5×)", "wordnet-nouns": "missing"}
    ranks = board.mean_ranks(rows, TASKS)
    assert ranks == {"sara": 1.5, "lora": 1.5}


def test_the_report_names_what_is_missing(board, records):
    report = board.render(records, TASKS, METHODS)
    r1 = report.split("## Budget lora-r1")[1].split("##")[0]
    # sara ran at r8 only: its r1 cells are due
    assert "| sara | adamw | missing |" in r1 and "| spt | adamw | missing |" in r1
    assert "| spt | adamw | unreachable | – | unreachable (5×) | missing |" in r8_of(report)
    natural = report.split("## Natural budgets")[1].split("##")[0]
    assert "| probe | adamw | missing |" in natural and "| full | adamw | missing |" in natural
    assert "| bitfit |" in natural and "bitfit" not in r1  # a method without a knob belongs at its natural budget
    r8 = report.split("## Budget lora-r8")[1].split("##")[0]
    sara_line = next(line for line in r8.splitlines() if "| sara ≠ |" in line)
    assert "| 90.0 ± 0.0 | 52.0 ± 2.0 |" in sara_line and "| 2.83 | 1.50 |" in sara_line
    lora_line = next(line for line in r8.splitlines() if "| lora |" in line)
    assert "| 1.00 | 1.00 | 1.00 |" in lora_line


def r8_of(report):
    return report.split("## Budget lora-r8")[1].split("##")[0]


def test_natural_budget_ratios_are_to_lora_at_the_largest_budget(board, records):
    rows = board.leaderboard_rows(records, TASKS, METHODS, "natural")
    bitfit = row_of(rows, "bitfit")
    assert (bitfit["trainable"], bitfit["step"], bitfit["memory"]) == pytest.approx((0.5, 0.5, 0.5))
    assert bitfit["tasks"]["wordnet-nouns"] is None and bitfit["matched"]


def test_render_and_plot_from_the_jsonl_are_written(board, records, tmp_path):
    from deltatune.bench.harness import RunLog, write_report

    log = RunLog(tmp_path / "leaderboard.jsonl", identity=board.CELL_IDENTITY)
    for record in records:
        log.append(record)
    out = tmp_path / "leaderboard.md"
    done = log.records()
    write_report(out, board.render(done, TASKS, METHODS), {out.with_suffix(".png"): board.plot(done, TASKS, METHODS)})
    assert out.read_text() == board.render(records, TASKS, METHODS)
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_reference_point_skipped_for_cost_runs_once_it_is_due(board, tmp_path):
    from deltatune.bench.harness import RunLog

    skipped = {"task": "wordnet-nouns", "method": "full", "budget": "natural", "match": None, "not_run": "cost",
               "runs": []}
    job = {"task": "wordnet-nouns", "method": "full", "budget": "natural"}
    for reference_tasks, due in ((["digits"], False), (["digits", "wordnet-nouns"], True)):
        log = RunLog(tmp_path / f"{len(reference_tasks)}.jsonl", identity=board.cell_identity(reference_tasks))
        log.append(skipped)
        assert (log.pending([job]) == [job]) is due
    rows = board.leaderboard_rows([skipped], TASKS, METHODS, "natural")
    assert row_of(rows, "full")["status"]["wordnet-nouns"] == "not run (cost)"
    done = cell("wordnet-nouns", "full", "natural", [0.7, 0.7, 0.7])
    assert row_of(board.leaderboard_rows([skipped, done], TASKS, METHODS, "natural"), "full")["tasks"][
        "wordnet-nouns"] == [0.7, 0.7, 0.7]  # the later, real record supersedes the skipped one


def test_a_rate_at_the_grid_edge_is_starred(board):
    edge = cell("digits", "lora", "lora-r8", [0.5, 0.5, 0.5], lr=0.03)
    edge["runs"] = [r for r in edge["runs"] if r["lr"] <= 0.03]  # nothing above the chosen rate was tried
    records = [edge, cell("wordnet-nouns", "lora", "lora-r8", [0.6, 0.6, 0.6], lr=0.01)]
    line = next(x for x in r8_of(board.render(records, TASKS, METHODS)).splitlines() if "| lora |" in x)
    assert "| 50.0 ± 0.0* | 60.0 ± 0.0 |" in line


def test_extending_an_edge_tries_rates_past_it_until_the_best_is_inside(board, monkeypatch):
    """A fake method whose validation peaks at lr 0.09: the top edge 0.03 is extended to 0.09, then 0.27 (worse),
    and the other seeds run at 0.09; the earlier runs are kept, not repeated."""
    calls = []

    def fake_run(cell, lr, seed):
        calls.append((lr, seed))
        score = 1.0 - abs(math.log(lr / 0.09))
        return {"lr": lr, "seed": seed, "validation": score, "test": score, "trainable": 10, "seconds": 1.0,
                "step_seconds": [0.5]}

    monkeypatch.setattr(board, "one_run", fake_run)
    first = board.run_cell({"task": "digits", "method": "lora", "budget": "lora-r8", "params": {}, "match": None})
    assert first["lr"] == 0.03 and board.at_edge(first) and board.next_rate(first["runs"]) == pytest.approx(0.09)
    job = {"task": "digits", "method": "lora", "budget": "lora-r8", "params": {}, "match": None}
    [edge] = board.edge_jobs([first], [job])
    calls.clear()
    second = board.run_cell(edge)
    assert [lr for lr, _ in calls] == pytest.approx([0.09, 0.27, 0.09, 0.09]) and [s for _, s in calls] == [0, 0, 1, 2]
    assert second["lr"] == pytest.approx(0.09) and not board.at_edge(second) and second["extended"]
    assert len(second["runs"]) == 9 and board.next_rate(second["runs"]) is None
    assert board.edge_jobs([first, second], [job]) == []  # the later record is inside: nothing left to extend
    identity = board.cell_identity(["digits"], extend_edges=True)
    assert identity(first) is None and identity(second) == ["digits", "lora", "lora-r8"]


def test_a_method_the_model_cannot_take_is_recorded_and_shown_as_not_applicable(board):
    from deltatune.errors import ConfigError

    def refusing(params):
        raise ConfigError("vpt: no block to prompt on the digits conv net")

    match = board.matched_knob("vpt", 1000, refusing)
    assert match["applies"] is False and "digits conv net" in match["reason"]
    knob = {"field": "num_tokens", "value": 4, "count": 1000, "target": 1000, "matched": True}
    matches = {"digits": {b: {"vpt": match} for b in ("lora-r1", "lora-r8")},
               "wordnet-nouns": {b: {"vpt": knob} for b in ("lora-r1", "lora-r8")}}
    jobs = [j for j in board.cells(TASKS, ["vpt"], matches) if j["method"] == "vpt"]
    assert [(j["task"], j["budget"], j["not_run"]) for j in jobs] == [
        ("digits", "natural", "n/a"), ("wordnet-nouns", "lora-r1", None), ("wordnet-nouns", "lora-r8", None)]
    records = [{**{k: jobs[0][k] for k in ("task", "method", "budget", "params", "match", "not_run")}, "runs": []},
               cell("wordnet-nouns", "vpt", "lora-r8", [0.5, 0.5, 0.5]),
               cell("wordnet-nouns", "lora", "lora-r8", [0.6, 0.6, 0.6])]
    report = board.render(records, TASKS, ["lora", "vpt"])
    vpt_line = next(line for line in r8_of(report).splitlines() if "| vpt |" in line)
    assert "| n/a | 50.0 ± 0.0 |" in vpt_line  # the digits column says why, the row still ranks
    assert "vpt" not in report.split("## Natural budgets")[1].split("##")[0]


def test_update_rule_rows_rank_with_the_others_and_time_against_their_anchor(board, records):
    """A `lora + sam` cell ranks in the same table as every method; its step time is its own anchor's ratio (2.0
    here), not the ratio to LoRA's cell run at another time (which would give 3.0/1.0 and 6.0/2.0)."""
    sam = [{**cell(task, "lora", "lora-r8", tests, step=step), "update_rule": "sam", "anchor_step_seconds": step / 2}
           for task, tests, step in (("digits", [0.95, 0.95, 0.95], 3.0), ("wordnet-nouns", [0.55, 0.55, 0.55], 6.0))]
    names = [*METHODS, *board.rule_contenders(["sam", "lora_pro"])]
    rows = board.leaderboard_rows(records + sam, TASKS, names, "lora-r8")
    assert [r["method"] for r in rows] == ["lora + sam", "lora", "sara", "lora + lora_pro", "spt"]
    assert row_of(rows, "lora + sam")["step"] == pytest.approx(2.0)
    assert row_of(rows, "lora + sam")["trainable"] == pytest.approx(1.0)
    assert row_of(rows, "lora")["tasks"]["digits"] == [0.78, 0.80, 0.82]  # the AdamW cell is not overwritten
    assert board.mean_ranks(rows, TASKS) == {"lora + sam": 1.5, "lora": 2.0, "sara": 2.5}
    table = r8_of(board.render(records + sam, TASKS, names))
    assert "| 1 | lora | sam | 1.5 | 75.0 | 95.0 ± 0.0 | 55.0 ± 0.0 | 1.00 | 2.00 |" in table
    assert "| – | lora | lora_pro | missing |" in table and "| lora | adamw | 2.0 |" in table


def test_rule_cells_keep_the_adamw_identity_and_add_their_own(board):
    identity = board.cell_identity(["digits"])
    old = {"task": "digits", "method": "lora", "budget": "lora-r8"}
    assert identity(old) == ["digits", "lora", "lora-r8"]  # the records written before the rules: unchanged
    assert identity({**old, "update_rule": "adamw"}) == identity(old)
    assert identity({**old, "update_rule": "mgpo"}) == ["digits", "lora", "lora-r8", "mgpo"]
    matches = {"digits": {b: {"lora": {"field": "rank", "value": 1, "count": 10, "target": 10, "matched": True},
                              "sara": {"field": "fraction", "value": 0.1, "count": 10, "target": 10, "matched": True}}
                          for b in ("lora-r1", "lora-r8")}}
    jobs = board.cells(["digits"], ["lora", "sara"], matches, update_rules=["sam"])
    ruled = [(j["method"], j["budget"]) for j in jobs if j.get("update_rule") == "sam"]
    assert ruled == [("lora", "lora-r1"), ("lora", "lora-r8")]  # LoRA's cells only, each budget
    with pytest.raises(board.ConfigError, match="not registered"):
        board.rule_contenders(["adam"])


def test_a_rule_cell_extends_its_edge_before_the_seeds_and_times_an_adamw_anchor(board, monkeypatch):
    calls = []

    def fake_run(cell, lr, seed):
        calls.append((board.rule_of(cell), lr, seed))
        score = 1.0 - abs(math.log(lr / 0.001))  # peaks below the grid: 0.003 is the edge, 0.001 the best
        return {"lr": lr, "seed": seed, "validation": score, "test": score, "trainable": 10, "seconds": 1.0,
                "step_seconds": [0.2 if board.rule_of(cell) == "adamw" else 0.4] * 4}

    monkeypatch.setattr(board, "one_run", fake_run)
    job = {"task": "digits", "method": "lora", "budget": "lora-r8", "params": {}, "match": None,
           "update_rule": "loraplus", "extend_edges": True}
    record = board.run_cell(job)
    assert [(rule, round(lr, 6), seed) for rule, lr, seed in calls] == [
        ("loraplus", 0.003, 0), ("loraplus", 0.01, 0), ("loraplus", 0.03, 0), ("loraplus", 0.001, 0),
        ("loraplus", 0.000333, 0), ("adamw", 0.001, 0), ("loraplus", 0.001, 1), ("loraplus", 0.001, 2)]
    assert record["update_rule"] == "loraplus" and record["lr"] == pytest.approx(0.001)
    assert record["step_seconds"] == pytest.approx(0.4) and record["anchor_step_seconds"] == pytest.approx(0.2)
    assert board.cell_key(record) == ["digits", "lora", "lora-r8", "loraplus"] and not board.at_edge(record)

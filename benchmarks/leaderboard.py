"""The leaderboard: every registered method (and the probe / full fine-tuning reference points) on every built-in
task, at matched trainable budgets, ranked by test accuracy; trainable count, step time and peak memory as ratios
to LoRA measured in the same run.

Methods: `deltatune.core.registry.list_methods()` — a method appears by registering. Tasks:
`deltatune.data.list_tasks()` (the WordNet text tasks on all-MiniLM-L6-v2, adapted on the recipe's default text
targets query/value, and digits, on the conv net's two conv layers — the digits net has no Linear layer but its
head). Budgets: the adapter's trainable count (head excluded: every method trains it) of LoRA at rank 1 and at
rank 8 on those targets; each method's declared budget knob (`DeltaConfig.budget_field`) is searched for the
nearest count (deltatune.bench.budget: no training, the adapted model is counted). A method whose knob cannot
reach a budget within 5% is shown with its nearest count and marked ≠; one without a knob (BitFit), or whose
count does not move with it (ID³ trains a dense update), is shown once at its natural budget, as are probe and
full.

Each run is `deltatune.recipe.finetune` (AdamW, linear decay, clipping 1.0, each method's regularizer and
allocator callbacks), with the protocol in PROTOCOL below — a small-budget protocol chosen to fit the whole grid
on 2 shared cores in about an hour: short training, short sequences, subsets of the validation and test splits.
The learning rate is tuned per method, task and budget on seed 0 over one grid for everyone (best validation
accuracy, ties to the smaller rate); seeds 1 and 2 then run at that rate; test accuracy is mean ± std over the
three seeds. Step time: median seconds per optimizer step (forward, backward, optimizer, callbacks; the first 2
steps of every run skipped) over the cell's runs. Peak memory: the peak RSS of the process that ran the cell.

Update rules (`deltatune.optim`): LoRA's cells are also run with each rule of UPDATE_RULES instead of AdamW
(each at its defaults: LoRA+ λ = 16, LoRA-Pro with the paper's full moments, SAM ρ = 0.05 over AdamW, MGPO's NLU
profile), the same protocol and grid; each is a row `lora + <rule>` ranked with the others, its update rule in
the table's "update rule" column (adamw for every other row). Their step time is a ratio to a LoRA + AdamW run
made in the same cell process, between the rule's tuning grid and its seeds (the anchor), not to LoRA's own
cell, which ran at another time under another load.

One cell = (task, method, budget[, update rule]): its five runs share one fresh child process (1 torch thread,
`--workers` at a time), which makes the peak RSS the cell's own; finished cells are appended to the JSONL file,
so a killed benchmark resumes at the first unfinished cell. Budget matches are computed once and cached next to
the JSONL.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/leaderboard.py --workers 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/leaderboard.py --render     # the table and plot from the JSONL
    # only the update-rule rows, each rate extended past an edge inside its cell (--extend-edges):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/leaderboard.py --workers 1 --methods lora --extend-edges
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from deltatune.bench import harness  # noqa: E402
from deltatune.bench.budget import TOLERANCE  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402
from deltatune.errors import BenchmarkError, ConfigError, DeltatuneError  # noqa: E402

RESULTS = Path("benchmarks/results")
REFERENCE = "lora"
REFERENCE_POINTS = ("probe", "full")
REFERENCE_TASKS = ("digits",)  # where the reference points run by default: on MiniLM they cost the most
LORA_RANKS = (1, 8)  # the budgets: what LoRA trains at these ranks
NATURAL = "natural"
NOT_APPLICABLE = "n/a"  # the method cannot adapt the task's model (recorded, not run)
PROTOCOL = dict(train_size=192, epochs=1, batch_size=16, max_length=16, validation_size=120, test_size=200)
LR_GRID = (3e-3, 1e-2, 3e-2)
EXTEND, MAX_EXTENSIONS = 3.0, 2  # --extend-edges: a best rate at an edge of those tried gets a neighbour ×/÷ 3
SEEDS = (0, 1, 2)
TIMING_SKIP = 2  # warm-up steps of each run left out of the step time
# digits trains in milliseconds a step: its whole training split, 2 epochs (80 steps)
TASK_PROTOCOL = {"digits": dict(train_size=None, epochs=2, validation_size=None, test_size=300)}
REACH = 0.15  # a knob whose nearest count is further than this from the budget is not run there (unreachable)
TASK_PARAMS = {"digits": {"targets": ("conv1", "conv2")}}  # the digits net's only layers besides its head
CELL_IDENTITY = ("task", "method", "budget")  # plus the update rule when it is not AdamW (see cell_key)
DEFAULT_RULE = "adamw"  # what every method trains with unless its cell names another rule
UPDATE_RULES = ("loraplus", "lora_pro", "sam", "mgpo")  # run on top of REFERENCE, each at its defaults


def cell_identity(reference_tasks: Sequence[str], extend_edges: bool = False):
    """(task, method, budget); a reference point skipped for cost identifies nothing once it is due on its task,
    so a run with more --reference-tasks computes it (and its record then supersedes the skipped one); with
    `extend_edges`, neither does a finished cell whose rate sits at an edge that can still be extended."""
    def identity(cell: dict) -> list | None:
        if cell.get("not_run") == "cost" and cell["task"] in reference_tasks:
            return None
        if extend_edges and cell.get("runs") and next_rate(cell["runs"]) is not None:
            return None
        return cell_key(cell) if all(k in cell for k in CELL_IDENTITY) else None

    return identity


def rule_of(cell: dict) -> str:
    """The cell's update rule: records written before the rules joined hold none, and trained with AdamW."""
    return cell.get("update_rule", DEFAULT_RULE)


def cell_key(cell: dict) -> list:
    """(task, method, budget), with the update rule appended when it is not AdamW: the AdamW cells keep the
    identity they were recorded with, so adding the rules re-runs none of them."""
    rule = rule_of(cell)
    return [*(cell[k] for k in CELL_IDENTITY), *([rule] if rule != DEFAULT_RULE else [])]


def contender(cell: dict) -> str:
    """The row a cell belongs to: its method, or `<method> + <rule>` for a rule other than AdamW."""
    rule = rule_of(cell)
    return cell["method"] if rule == DEFAULT_RULE else f"{cell['method']} + {rule}"


def _rule_field(cell: dict) -> dict:
    """The record's update-rule entry: none for AdamW, so those records read as the ones written before."""
    return {"update_rule": rule_of(cell)} if rule_of(cell) != DEFAULT_RULE else {}


def split_contender(name: str) -> tuple[str, str]:
    """(method, update rule) of a row name made by `contender`."""
    method, _, rule = name.partition(" + ")
    return method, rule or DEFAULT_RULE


def rule_contenders(rules: Sequence[str]) -> list[str]:
    """The row names of REFERENCE under each rule; an unknown rule is refused with the known ones."""
    from deltatune.optim import available_update_rules

    unknown = [rule for rule in rules if rule not in available_update_rules()]
    if unknown:
        raise ConfigError(f"update rule(s) {unknown} are not registered: expected names from "
                          f"{list(available_update_rules())} (deltatune.optim)")
    return [contender({"method": REFERENCE, "update_rule": rule}) for rule in rules]


def budget_name(rank: int) -> str:
    return f"lora-r{rank}"


# --- the grid ---------------------------------------------------------------------------------------------------
def methods() -> list[str]:
    from deltatune.core.registry import list_methods

    return [entry.name for entry in list_methods()]


def tasks() -> list[str]:
    """Every built-in task scored by accuracy, the cheap digits first. The table ranks accuracies; tasks with
    another metric (generation) are compared with `deltatune compare`, which ranks by the task's own metric."""
    from deltatune.data import list_tasks

    classification = [name for name in list_tasks() if load(name).metric == "accuracy"]
    return sorted(classification, key=lambda name: name != "digits")


def recorded_tasks(records: Sequence[dict]) -> list[str]:
    """The tasks the records hold, in the order `tasks()` gives them (what `--render` shows by default)."""
    held = {record["task"] for record in records}
    return [name for name in tasks() if name in held]


def load(task: str):
    from deltatune.data import load_task

    return load_task(task, max_length=PROTOCOL["max_length"], train_size=PROTOCOL["train_size"], seed=0)


def model_fingerprint(task) -> str:
    """Tasks whose models differ only in their head share budget matches (the head is not counted)."""
    import torch

    torch.manual_seed(0)
    model = task.build_model()
    head = tuple(task.extra_trainable)
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if not n.startswith(head)]
    return json.dumps([type(model).__name__, shapes, TASK_PARAMS.get(task.name, {})])


def budget_matches(task_names: Sequence[str], method_names: Sequence[str], cache: Path) -> dict[str, dict]:
    """task -> budget -> method -> match (as a dict), for every method with a knob; computed once per model kind
    and cached in `cache` (a JSON file), since matching SPT plans its allocation at every probe."""
    from deltatune.bench.budget import task_counter

    stored = json.loads(cache.read_text()) if cache.exists() else {}
    table: dict[str, dict] = {}
    for name in task_names:
        task = load(name)
        key = model_fingerprint(task)
        entry = stored.setdefault(key, {})
        common = TASK_PARAMS.get(name, {})
        batch_size = {**PROTOCOL, **TASK_PROTOCOL.get(name, {})}["batch_size"]  # SPT plans on training batches
        for rank in LORA_RANKS:
            found = entry.setdefault(budget_name(rank), {})
            target = task_counter(task, REFERENCE, common=common, batch_size=batch_size)({"rank": rank})
            for method in method_names:
                if method not in found:
                    print(f"matching {method} to {budget_name(rank)} ({target:,}) on {name}", flush=True)
                    found[method] = matched_knob(method, target, task_counter(task, method, common=common,
                                                                               batch_size=batch_size))
                    harness.write_json(cache, stored)
        table[name] = entry
    return table


def matched_knob(method: str, target: int, counter) -> dict:
    """The budget match as a dict; a method the task's model cannot take at all (prompt tokens or blocks on the
    digits conv net) is recorded as not applicable with the refusal, so its row says n/a instead of failing."""
    from deltatune.bench.budget import match_budget

    try:
        match = match_budget(method, target, counter)
    except DeltatuneError as error:
        return {"field": None, "value": None, "count": None, "target": target, "matched": False,
                "applies": False, "reason": default_refusal(counter) or str(error).splitlines()[0]}
    return {"field": match.field, "value": match.value, "count": match.count, "target": target,
            "matched": match.matched}


def default_refusal(counter) -> str | None:
    """Why the method at its defaults cannot adapt the model (the search's own error only says no knob value
    worked), or None if its defaults are accepted."""
    try:
        counter({})
    except DeltatuneError as error:
        return str(error).splitlines()[0]
    return None


def applies(match: dict | None) -> bool:
    return match is None or match.get("applies", True)


def cells(task_names: Sequence[str], method_names: Sequence[str], matches: dict[str, dict],
          reference_tasks: Sequence[str] = REFERENCE_TASKS, update_rules: Sequence[str] = ()) -> list[dict]:
    """One job per (task, method, budget): every knob method at every budget, the others once (natural); then
    REFERENCE's jobs again under each of `update_rules` (when REFERENCE is among the methods)."""
    jobs = []
    for task in task_names:
        for method in (*method_names, *REFERENCE_POINTS):
            knobbed = [budget_name(r) for r in LORA_RANKS if matches[task][budget_name(r)].get(method, {}).get("field")]
            for budget in knobbed or [NATURAL]:
                match = matches[task][budget if budget != NATURAL else budget_name(max(LORA_RANKS))].get(method)
                knob = {match["field"]: match["value"]} if match and match["field"] else {}
                skip = "cost" if method in REFERENCE_POINTS and task not in reference_tasks else None
                if not applies(match):
                    skip = NOT_APPLICABLE
                elif budget != NATURAL and off_budget(match) > REACH:
                    skip = "unreachable"
                jobs.append(dict(task=task, method=method, budget=budget,
                                 params={**TASK_PARAMS.get(task, {}), **knob}, match=match, not_run=skip))
    jobs = sorted(jobs, key=lambda j: (task_names.index(j["task"]), j["method"] != REFERENCE))
    return jobs + [{**job, "update_rule": rule} for rule in update_rules for job in jobs
                   if job["method"] == REFERENCE]


def off_budget(match: dict) -> float:
    """How far the matched count is from the budget, relative to it (0 = exact)."""
    return abs(match["count"] - match["target"]) / match["target"]


def edge_jobs(records: Sequence[dict], jobs: Sequence[dict]) -> list[dict]:
    """The grid's jobs whose last record ran at an edge that can still be extended, carrying that record."""
    last = {tuple(cell_key(r)): r for r in records}
    chosen = []
    for job in jobs:
        record = last.get(tuple(cell_key(job)))
        if record and record.get("runs") and next_rate(record["runs"]) is not None:
            chosen.append({**job, "prior": {k: record[k] for k in ("runs", "step_seconds", "peak_rss_mb")}})
    return chosen


# --- one cell (in its own process) --------------------------------------------------------------------------------


def one_run(cell: dict, lr: float, seed: int) -> dict:
    from deltatune.recipe import FULL, PROBE, finetune

    timer = harness.StepTimer()
    params = {} if cell["method"] in (PROBE, FULL) else cell["params"]
    protocol = {**PROTOCOL, **TASK_PROTOCOL.get(cell["task"], {})}
    result = finetune(cell["task"], cell["method"], params, lr=lr, seed=seed, progress=False, callbacks=(timer,),
                      update_rule=rule_of(cell), **protocol)
    return {"lr": lr, "seed": seed, "validation": result.validation_score, "test": result.test_score,
            "trainable": result.trainable.trainable, "seconds": result.seconds,
            "step_seconds": timer.seconds[TIMING_SKIP:]}


def run_cell(cell: dict) -> dict:
    """Tune the lr on seed 0, run the other seeds at the chosen lr; the record carries every run. A cell with
    `prior` (its earlier record, --extend-edges) keeps those runs and extends the rates past the edge first; a
    fresh cell with `extend_edges` extends past an edge of its grid before its seeds run. A cell under an update
    rule also makes one LoRA + AdamW run (`anchor`) between its grid and its seeds, the reference of its step
    time measured in the same process."""
    prior = cell.get("prior")
    runs = [dict(r) for r in prior["runs"]] if prior else [one_run(cell, lr, SEEDS[0]) for lr in LR_GRID]
    while (prior or cell.get("extend_edges")) and (following := next_rate(runs)) is not None:
        runs.append(one_run(cell, following, SEEDS[0]))
    anchor = one_run({**cell, "update_rule": DEFAULT_RULE}, chosen_lr(runs), SEEDS[0]) \
        if rule_of(cell) != DEFAULT_RULE else None
    chosen = chosen_lr(runs)
    done = {(r["lr"], r["seed"]) for r in runs}
    runs += [one_run(cell, chosen, seed) for seed in SEEDS[1:] if (chosen, seed) not in done]
    steps = [s for run in runs for s in run.pop("step_seconds", [])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rule = _rule_field(cell)
    if anchor is not None:
        rule |= {"anchor_step_seconds": statistics.median(anchor.pop("step_seconds")), "anchor_run": anchor}
    return {**{k: cell[k] for k in CELL_IDENTITY}, **rule, "params": cell["params"], "match": cell["match"],
            "lr": chosen, "runs": runs, "step_seconds": statistics.median(steps) if steps else prior["step_seconds"],
            "peak_rss_mb": max(peak, prior["peak_rss_mb"]) if prior else peak,
            **({"extended": True} if prior or len(tried_rates(runs)) > len(LR_GRID) else {})}


def tried_rates(runs: Sequence[dict]) -> list[float]:
    return sorted({r["lr"] for r in runs if r["seed"] == SEEDS[0]})


def at_edge(record: dict) -> bool:
    """The rate chosen on validation is the smallest or largest one tried: the method may do better outside."""
    tried = tried_rates(record["runs"])
    return record["lr"] in (tried[0], tried[-1])


def next_rate(runs: Sequence[dict]) -> float | None:
    """The neighbour past the edge where the best seed-0 rate sits, within MAX_EXTENSIONS of the grid; or None."""
    tried, best = tried_rates(runs), chosen_lr(runs)
    if best == tried[-1] and best < max(LR_GRID) * EXTEND ** MAX_EXTENSIONS / 1.01:
        return best * EXTEND
    if best == tried[0] and best > min(LR_GRID) / EXTEND ** MAX_EXTENSIONS * 1.01:
        return best / EXTEND
    return None


def chosen_lr(runs: Sequence[dict]) -> float:
    tuning = [r for r in runs if r["seed"] == SEEDS[0]]
    return min(tuning, key=lambda r: (-r["validation"], r["lr"]))["lr"]


def launch(cell: dict, threads: int) -> dict:
    command = harness.script_command(__file__, "--run", json.dumps(cell), "--threads", str(threads))
    started = time.perf_counter()
    result = harness.run_child(command, label=f"cell {cell['task']} {contender(cell)} {cell['budget']}")
    tests = [r["test"] for r in result["runs"] if r["lr"] == result["lr"]]
    print(f"done {cell['task']} {contender(cell)} {cell['budget']}: lr {result['lr']:g} test {mean_std(tests)} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return result


# --- the report -------------------------------------------------------------------------------------------------
def final_tests(record: dict) -> list[float]:
    return [r["test"] for r in record["runs"] if r["lr"] == record["lr"]]


def ratio(value: float | None, reference: float | None, digits: int = 2) -> str:
    if value is None or not reference:
        return "–"
    return f"{value / reference:.{digits}f}"


def unreachable(cell: dict) -> bool:
    """A knob cell whose nearest count is further than REACH from the budget (not run; an older run ignored)."""
    match = cell.get("match")
    return bool(cell.get("unreachable")) or (cell["budget"] != NATURAL and bool(match) and off_budget(match) > REACH)


def ran_cell(cell: dict | None) -> bool:
    return cell is not None and not unreachable(cell) and cell.get("not_run") is None


def leaderboard_rows(records: Sequence[dict], task_names: Sequence[str], method_names: Sequence[str],
                     budget: str) -> list[dict]:
    """One row per method (or `method + rule`, see `contender`) at `budget` (NATURAL: the methods and reference
    points without a knob): per-task accuracy (or why there is none), and ratios to LoRA + AdamW at the same task
    and budget (at NATURAL: to LoRA at the largest budget), geometric means over the tasks. The step time of a
    cell with an anchor (an update rule's) is a ratio to its anchor's, measured in the same process."""
    by_cell = {(r["task"], contender(r), r["budget"]): r for r in records}
    reference_budget = budget if budget != NATURAL else budget_name(max(LORA_RANKS))
    candidates = [m for m in (*method_names, *REFERENCE_POINTS)
                  if any(k[1] == m and k[2] == budget and by_cell[k].get("not_run") != NOT_APPLICABLE for k in by_cell)
                  or _expected(m, budget, records)]
    rows = []
    for method in candidates:
        found = {t: by_cell.get((t, method, budget)) or _not_applicable(by_cell.get((t, method, NATURAL)))
                 for t in task_names}
        ran = {t: c for t, c in found.items() if ran_cell(c)}
        row = {"method": method, "tasks": {t: final_tests(ran[t]) if t in ran else None for t in task_names},
               "edge": {t for t, c in ran.items() if at_edge(c)},
               "status": {t: _status(c) for t, c in found.items() if t not in ran}}
        references = {t: by_cell[(t, REFERENCE, reference_budget)] for t in ran
                      if (t, REFERENCE, reference_budget) in by_cell}
        for key, getter in (("trainable", lambda c: c["runs"][0]["trainable"]),
                            ("step", lambda c: c["step_seconds"]), ("memory", lambda c: c["peak_rss_mb"])):
            ratios = [getter(cell) / _reference_value(key, getter, cell, references[task])
                      for task, cell in ran.items() if task in references]
            row[key] = statistics.geometric_mean(ratios) if ratios else None
        row["matched"] = budget == NATURAL or all(off_budget(c["match"]) <= TOLERANCE for c in ran.values()
                                                  if c.get("match"))
        row["unreachable"] = not ran and any(c and unreachable(c) for c in found.values())
        row["mean"] = statistics.mean(statistics.mean(v) for v in row["tasks"].values() if v) if ran else None
        rows.append(row)
    ranks = mean_ranks(rows, task_names)  # sorted by mean rank: a mean over unequal task sets would mislead
    return sorted(rows, key=lambda r: (r["mean"] is None, r["unreachable"], ranks.get(r["method"], 0),
                                       -(r["mean"] or 0), r["method"]))


def _reference_value(key: str, getter, cell: dict, lora_cell: dict) -> float:
    """What a cell's value is divided by: LoRA's cell, except the step time of a cell that timed its own LoRA +
    AdamW anchor run (same process, adjacent in time: the load on the shared machine cancels)."""
    return cell["anchor_step_seconds"] if key == "step" and "anchor_step_seconds" in cell else getter(lora_cell)


def _not_applicable(cell: dict | None) -> dict | None:
    """A method that cannot adapt a task's model is recorded once, at the natural budget: every budget shows it."""
    return cell if cell and cell.get("not_run") == NOT_APPLICABLE else None


def _status(cell: dict | None) -> str:
    if cell is None:
        return "missing"
    if cell.get("not_run") == "cost":
        return "not run (cost)"
    if cell.get("not_run") == NOT_APPLICABLE:
        return NOT_APPLICABLE
    return f"unreachable ({cell['match']['count'] / cell['match']['target']:.2g}×)"


def _row_reason(row: dict) -> str:
    """Why a row has no accuracy: n/a when no task's model can take the method, else some cells are missing."""
    return NOT_APPLICABLE if set(row["status"].values()) == {NOT_APPLICABLE} else "missing"


def _expected(method: str, budget: str, records: Sequence[dict]) -> bool:
    """Whether `method` belongs at `budget` although no cell of it finished there (so it shows as missing):
    where its other cells ran, or, with none, where its declared knob puts it."""
    ran = {r["budget"] == NATURAL for r in records if contender(r) == method and r.get("not_run") != NOT_APPLICABLE}
    if not ran:
        from deltatune.bench.budget import budget_field

        base = split_contender(method)[0]
        ran = {base in REFERENCE_POINTS or budget_field(base)[0] is None}
    return (budget == NATURAL) in ran


def mean_ranks(rows: Sequence[dict], task_names: Sequence[str]) -> dict[str, float]:
    """Each method's rank (1 = best mean test accuracy) averaged over the tasks where it ran."""
    ranks: dict[str, list[int]] = {}
    for task in task_names:
        # ties by name: the ranks must not depend on the order the rows come in (the table re-ranks sorted rows)
        ran = sorted((r for r in rows if r["tasks"].get(task)),
                     key=lambda r: (-statistics.mean(r["tasks"][task]), r["method"]))
        for position, row in enumerate(ran, start=1):
            ranks.setdefault(row["method"], []).append(position)
    return {m: statistics.mean(v) for m, v in ranks.items()}


def budget_table(records: Sequence[dict], task_names: Sequence[str], method_names: Sequence[str],
                 budget: str) -> list[str]:
    rows = leaderboard_rows(records, task_names, method_names, budget)
    ranks = mean_ranks(rows, task_names)
    header = ("| # | method | update rule | mean rank | mean test | " + " | ".join(task_names)
              + " | trainable ×LoRA | step time ×LoRA | peak memory ×LoRA |")
    lines = [header, "| ---: | --- | --- | ---: | ---: |" + " ---: |" * len(task_names) + " ---: | ---: | ---: |"]
    for position, row in enumerate(rows, start=1):
        method, rule = split_contender(row["method"])
        label = method + ("" if row["matched"] else " ≠")
        if row["mean"] is None:
            reason = "unreachable" if row["unreachable"] else _row_reason(row)
            cells = " | ".join(row["status"].get(t, "–") for t in task_names)
            lines.append(f"| – | {method} | {rule} | {reason} | – | {cells} | – | – | – |")
            continue
        accuracy = " | ".join(mean_std(v) + ("*" if t in row["edge"] else "") if v else row["status"][t]
                              for t, v in row["tasks"].items())
        lines.append(f"| {position} | {label} | {rule} | {ranks.get(row['method'], 0):.1f} | {100 * row['mean']:.1f} | "
                     f"{accuracy} | {ratio(row['trainable'], 1)} | {ratio(row['step'], 1)} | "
                     f"{ratio(row['memory'], 1)} |")
    return lines


def budgets_in(records: Sequence[dict]) -> list[str]:
    present = {r["budget"] for r in records}
    return [b for b in (*(budget_name(r) for r in LORA_RANKS), NATURAL) if b in present or b != NATURAL]


def render(records: Sequence[dict], task_names: Sequence[str], method_names: Sequence[str]) -> str:
    env = next((r["environment"] for r in records if r.get("environment")), {})
    lines = ["# Leaderboard: every registered method on every built-in task at matched trainable budgets", "",
             harness.environment_line(env) if env else "", "",
             "Command: `python benchmarks/leaderboard.py --workers 2` (re-render: `--render`)", "",
             "**A small-budget protocol** (sized for the whole grid to take about an hour on 2 shared CPU cores): "
             f"train on a fixed stratified subset of {PROTOCOL['train_size']} examples (drawn per seed), "
             f"{PROTOCOL['epochs']} epoch(s) of batch {PROTOCOL['batch_size']} "
             f"({-(-PROTOCOL['train_size'] // PROTOCOL['batch_size']) * PROTOCOL['epochs']} steps on the text "
             f"tasks), max length {PROTOCOL['max_length']} tokens; validation on {PROTOCOL['validation_size']} and "
             f"test on {PROTOCOL['test_size']} fixed stratified examples. Digits (milliseconds a step): "
             f"its whole training split, {TASK_PROTOCOL['digits']['epochs']} epochs instead; validation on its whole "
             "179, test on 300 of its 359. lr grid "
             f"{list(LR_GRID)} for every method, tuned per task and budget on seed 0's validation accuracy; seeds "
             f"{list(SEEDS)} at the chosen lr. Rankings at this length say which methods learn fastest from few "
             "steps, not which end best after a full fine-tuning. "
             f"{reference_note(records, task_names)}", "",
             "Test accuracy in % (mean ± std over 3 seeds). Ratios are geometric means over the tasks of the "
             "method's value over LoRA's at the same task and budget, measured in the same run (step time: "
             "median s per optimizer step; peak memory: peak RSS of the cell's process, which includes "
             "Python, torch and the model, so differences are diluted). ≠: the method's budget knob cannot reach "
             "the budget within 5% (its nearest count, within 15%, is used; see the trainable ratio). Rows are "
             "sorted by mean rank: the method's rank on each task it ran (1 = best in this table), averaged; "
             "mean test is over the tasks it ran. unreachable (k×): the knob's nearest count is k× the budget, "
             f"more than {REACH:.0%} away, so the cell was not run. n/a: the method cannot adapt that task's "
             "model (prompt tokens or transformer blocks on the digits conv net). *: the rate chosen on validation "
             "is the smallest or largest tried, so the method may do better outside them (`--extend-edges` tries "
             f"×/÷ {EXTEND:g} past the edge, up to {MAX_EXTENSIONS} times past the grid; cells still starred: read "
             "as lower bounds). Update rule: how the gradients became updates (`deltatune.optim`; adamw unless "
             "named). The `lora + <rule>` rows are LoRA's cells re-run under that rule at its defaults (loraplus "
             "λ = 16; lora_pro with the paper's full-size moments; sam ρ = 0.05 over AdamW; mgpo ρ = 0.05, "
             "μ = β = 0.9), with the same grid, each rate extended past an edge before the seeds ran; their step "
             "time is a ratio to a LoRA + AdamW run made in the same cell process (the anchor), not to LoRA's "
             "cell.", ""]
    for budget in budgets_in(records):
        title = (f"## Budget {budget}: LoRA rank {budget.removeprefix('lora-r')}'s trainable count"
                 if budget != NATURAL else
                 f"## Natural budgets (no budget knob) and reference points; ratios to LoRA at "
                 f"{budget_name(max(LORA_RANKS))}")
        lines += [title, "", *budget_table(records, task_names, method_names, budget), ""]
    lines += ["## Chosen learning rates and budget knobs", "",
              "| task | method | update rule | budget | knob | count | target | lr |",
              "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
    latest = {tuple(cell_key(r)): r for r in records}  # a re-opened cell's last record
    for r in sorted((r for r in latest.values() if ran_cell(r)),
                    key=lambda r: (task_names.index(r["task"]) if r["task"] in task_names else 99, r["budget"],
                                   r["method"], rule_of(r) != DEFAULT_RULE, rule_of(r))):
        match = r.get("match") or {}
        knob = f"{match['field']}={_short(match['value'])}" if match.get("field") else "–"
        edge = " (edge of the rates tried)" if at_edge(r) else ""
        lines.append(f"| {r['task']} | {r['method']} | {rule_of(r)} | {r['budget']} | {knob} | "
                     f"{match.get('count', '–')} | {match.get('target', '–')} | {r['lr']:g}{edge} |")
    lines += natural_reasons(records, method_names)
    lines += ["", "Plot: leaderboard.png next to this file. Raw numbers: leaderboard.jsonl (one line per cell, every "
              "run inside), budget matches: leaderboard_budgets.json.", ""]
    return "\n".join(lines)


def natural_reasons(records: Sequence[dict], method_names: Sequence[str]) -> list[str]:
    """Why each method without budget cells is at its natural budget: no knob, or a knob that moves no count."""
    from deltatune.bench.budget import budget_field

    natural = sorted({r["method"] for r in records if r["budget"] == NATURAL} & set(method_names))
    unmoved = [f"{m} (`{budget_field(m)[0]}`)" for m in natural if budget_field(m)[0] is not None]
    knobless = [m for m in natural if budget_field(m)[0] is None]
    lines = ["", "At their natural budget without a budget knob: " + ", ".join(knobless) + "."] if knobless else []
    if unmoved:
        lines.append("The knob of " + ", ".join(unmoved) + " does not change the trainable count after adapting "
                     "(ID³ trains a dense update and unmasks its budget of entries during training, so its "
                     "trainable ratio counts the dense tensor).")
    return lines


def reference_note(records: Sequence[dict], task_names: Sequence[str]) -> str:
    """Which tasks the reference points probe and full ran on, when not all."""
    covered = [t for t in task_names if any(r["task"] == t and r["method"] in REFERENCE_POINTS and ran_cell(r)
                                            for r in records)]
    if covered == list(task_names):
        return ("Full fine-tuning trains every MiniLM weight and wants a far smaller rate than this grid "
                f"(from {min(LR_GRID):g}; the recipe's is 5e-5): on the text tasks it diverges or sits at the "
                "grid's low edge, so its text cells are lower bounds; probe (the head alone) is the floor.")
    return (f"The reference points probe and full ran on {', '.join(covered) or 'no task'} only (on MiniLM they "
            "cost the most; `--reference-tasks` adds them).")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(records: Sequence[dict], task_names: Sequence[str], method_names: Sequence[str]):
    """Per budget: each method's test accuracy on each task (dots) and its mean over tasks (bar)."""
    plt = harness.pyplot()
    budgets = budgets_in(records)
    figure, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 5), squeeze=False)
    colors = dict(zip(task_names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for axis, budget in zip(axes[0], budgets):
        rows = [r for r in leaderboard_rows(records, task_names, method_names, budget) if r["mean"] is not None]
        positions = range(len(rows))
        axis.barh(list(positions), [100 * r["mean"] for r in rows], color="0.85")
        for index, row in enumerate(rows):
            for task, values in row["tasks"].items():
                if values:
                    axis.plot(100 * statistics.mean(values), index, "o", color=colors[task], markersize=4)
        axis.set_yticks(list(positions), [r["method"] + ("" if r["matched"] else " ≠") for r in rows])
        axis.invert_yaxis()
        axis.set_xlabel("test accuracy (%)")
        axis.set_title(budget)
        axis.grid(axis="x", alpha=0.3)
    for task, color in colors.items():  # one legend entry per task, whichever rows ran it
        axes[0][0].plot([], [], "o", color=color, markersize=4, label=task)
    axes[0][0].legend(loc="lower left", fontsize=7)
    figure.suptitle("deltatune leaderboard (bars: mean over tasks; dots: per task; small-budget protocol)")
    figure.tight_layout()
    return figure


# --- driver -----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jsonl", type=Path, default=RESULTS / "leaderboard.jsonl")
    parser.add_argument("--output", type=Path, default=RESULTS / "leaderboard.md")
    parser.add_argument("--tasks", nargs="*", help="a subset of the tasks (default: every built-in task)")
    parser.add_argument("--methods", nargs="*", help="a subset of the methods (default: every registered one)")
    parser.add_argument("--reference-tasks", nargs="*", default=list(REFERENCE_TASKS),
                        help="tasks where probe and full run (`all`: every task)")
    parser.add_argument("--update-rules", nargs="*", default=list(UPDATE_RULES),
                        help=f"rules run on top of {REFERENCE} as rows `{REFERENCE} + <rule>` (default: %(default)s;"
                             " none: give the flag alone)")
    parser.add_argument("--extend-edges", action="store_true",
                        help="re-open finished cells whose best rate is at an edge: extend the rates past it; cells "
                             "not run yet extend past an edge of the grid before their seeds")
    parser.add_argument("--render", action="store_true", help="only re-write the table and plot from the JSONL")
    parser.add_argument("--match-only", action="store_true", help="only compute (and cache) the budget matches")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.run:
        harness.emit(run_cell(json.loads(args.run)))
        return
    method_names = args.methods or methods()
    rules = args.update_rules if REFERENCE in method_names else []
    row_names = [*method_names, *rule_contenders(rules)]
    if args.tasks:
        task_names = args.tasks
    else:
        task_names = recorded_tasks(harness.RunLog(args.jsonl, CELL_IDENTITY).records()) if args.render else tasks()
    reference_tasks = task_names if args.reference_tasks == ["all"] else args.reference_tasks
    log = harness.RunLog(args.jsonl, identity=cell_identity(reference_tasks, args.extend_edges))
    failure: BenchmarkError | None = None
    if not args.render:
        matches = budget_matches(task_names, method_names, args.jsonl.with_name(args.jsonl.stem + "_budgets.json"))
        if args.match_only:
            return
        env = harness.environment(threads=args.threads)

        def run(cell: dict) -> dict:
            if cell["not_run"]:  # recorded without running: the row says why (how far the knob gets)
                return {**{k: cell[k] for k in CELL_IDENTITY}, **_rule_field(cell), "params": cell["params"],
                        "match": cell["match"], "not_run": cell["not_run"],
                        "unreachable": cell["not_run"] == "unreachable", "runs": []}
            return {**launch(cell, args.threads), "environment": env}

        try:
            jobs = cells(task_names, method_names, matches, reference_tasks, rules)
            if args.extend_edges:  # the finished cells at an edge with their runs so far, and the fresh cells
                finished = {log.identity(r) for r in log.records()}
                fresh = [{**job, "extend_edges": True} for job in jobs if log.identity(job) not in finished]
                jobs = edge_jobs(log.records(), jobs) + fresh
            harness.run_jobs(jobs, log, run, workers=args.workers)
        except BenchmarkError as error:  # the other cells finished: report them, the failed one shows as missing
            failure = error
    records = log.records()
    report = render(records, task_names, row_names)
    print(report)
    harness.write_report(args.output, report, {args.output.with_suffix(".png"): plot(records, task_names,
                                                                                      row_names)})
    if failure is not None:
        raise failure


if __name__ == "__main__":
    main()

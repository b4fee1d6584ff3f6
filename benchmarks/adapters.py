"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) vs LoRA at matched trainable counts, on MiniLM and the glyph ViT.

Tasks: `wordnet-nouns` (noun glosses -> 10 lexicographer classes; all-MiniLM-L6-v2 + mean pooling + a Linear head,
the task of benchmarks/adaptive_rank.py) and `glyphs-novel-vit` (24 unseen Greek letters on the pretrained
GlyphViT, fresh head). Every method trains the task's head too (left out of the counts).

Methods, each at the trainable count of the adapters library's Pfeiffer default (reduction factor 16) on that
backbone, the others matched to it by `deltatune.bench.budget.match_budget` (adapters: `bottleneck_size`, LoRA:
`rank`):
    houlsby   bottleneck_adapter, targets="houlsby" (after attention output and FFN output), swish, "bert" init
    pfeiffer  bottleneck_adapter, targets="pfeiffer" (after the FFN output), ReLU, "bert" init
    parallel  parallel_adapter, targets="pfeiffer" (beside the FFN output projection), ReLU, scaling 4, zero up
    lora      LoRA on the task's default targets (query/value; q_proj/v_proj on the ViT), alpha = 2·rank

Training: recipe.finetune (AdamW, no weight decay, linear decay, clipping 1.0), batch 32; MiniLM: a stratified
1,000-example training subset, 2 epochs, max length 32, validation 300, test 1,000 examples; ViT: 1,500 training
images, 3 epochs, validation 300, test 1,000. Learning rate per method and task: the best of LR_GRID on validation
with seed 0 (extended by one step while the best is at an edge); then seeds 0, 1, 2 at that rate: test accuracy
mean ± std.

Step time and peak memory (ratios to LoRA): `timing` builds the four contenders on one batch in one process and
alternates them step by step (A B C D ...; whole steps: forward, backward, AdamW step, zero_grad, each timed by
deltatune.bench.harness.StepTimer), median of the timed steps, repeated twice. `memory` trains each contender
a few steps in its own fresh process and reads the resident memory a training step adds above the loaded model
(sampled after forward, backward and optimizer step; the peak RSS of the process is dominated by loading the
task and is reported raw).

    flock /work/wt/heavy.lock python benchmarks/adapters.py all --workers 2
    python benchmarks/adapters.py report
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from deltatune.bench import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = Path(os.environ.get("ADAPTERS_BENCH_WORK", "/tmp/deltatune-adapters-bench"))
TASKS = {
    "wordnet-nouns": dict(train_size=1000, epochs=2, max_length=32, validation_size=300, test_size=1000),
    "glyphs-novel-vit": dict(train_size=1500, epochs=3, validation_size=300, test_size=1000),
}
if os.environ.get("ADAPTERS_BENCH_SMOKE"):  # a one-minute end-to-end check of the script itself
    TASKS = {name: {**p, "train_size": 64, "epochs": 1, "validation_size": 32, "test_size": 32}
             for name, p in TASKS.items()}
METHODS = ("houlsby", "pfeiffer", "parallel", "lora")
METHOD_OF = {"houlsby": "bottleneck_adapter", "pfeiffer": "bottleneck_adapter", "parallel": "parallel_adapter",
             "lora": "lora"}
PLACEMENT = {"houlsby": {"targets": "houlsby"}, "pfeiffer": {"targets": "pfeiffer"},
             "parallel": {"targets": "pfeiffer"}, "lora": {}}
LR_GRID = (1e-3, 3e-3, 1e-2)
LR_EDGES = (3e-4, 3e-2)  # one step beyond each end, tried when the best rate sits at that end
SEEDS = (0, 1, 2)
BATCH = 32
TIMED_STEPS, WARMUP, REPEATS, MEMORY_STEPS = 12, 2, 2, 5


# --- budgets ------------------------------------------------------------------------------------------------
def matched_params(task_name: str) -> dict[str, dict]:
    """Each method's parameters on `task_name`, its knob matched to Pfeiffer's library-default count."""
    from deltatune.bench.budget import adapter_count, match_budget, task_counter
    from deltatune.data import load_task
    from deltatune.recipe import prepare_model

    task = load_task(task_name, **_load_args(task_name))
    pfeiffer, _ = prepare_model(task, "bottleneck_adapter", {"targets": "pfeiffer"}, seed=0)
    target = adapter_count(pfeiffer, tuple(task.extra_trainable))
    chosen = {}
    for label in METHODS:
        method = METHOD_OF[label]
        common = dict(PLACEMENT[label])
        counter = task_counter(task, method, common=common)
        match = match_budget(method, target, counter)
        params = {**common, **match.params()}
        if label == "lora":
            params["alpha"] = 2.0 * params["rank"]
        chosen[label] = {"params": params, "count": match.count, "target": target}
    return chosen


def _load_args(task_name: str) -> dict:
    protocol = TASKS[task_name]
    return {k: protocol[k] for k in ("train_size", "max_length") if k in protocol}


def budgets() -> dict:
    path = WORK / "budgets.json"
    if path.exists():
        return json.loads(path.read_text())
    found = {task: matched_params(task) for task in TASKS}
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=1))
    return found


# --- accuracy -----------------------------------------------------------------------------------------------
def run_one(job: dict) -> dict:
    """Train one (task, method, lr, seed) in this process; validation and test accuracy."""
    from deltatune.recipe import finetune

    torch.set_num_threads(1)
    params = budgets()[job["task"]][job["method"]]["params"]
    timer = harness.StepTimer()
    result = finetune(job["task"], METHOD_OF[job["method"]], params, lr=job["lr"], seed=job["seed"], batch_size=BATCH,
                      progress=False, callbacks=(timer,), **TASKS[job["task"]])
    return {**job, "validation": result.validation_score, "test": result.test_score,
            "trainable": result.trainable.trainable, "seconds": result.seconds,
            "step_median": statistics.median(timer.seconds[WARMUP:]) if len(timer.seconds) > WARMUP else None}


IDENTITY = ("task", "method", "lr", "seed")


def _child(job: dict) -> dict:
    command = harness.script_command(__file__, "one", json.dumps(job))
    result = harness.run_child(command, label=f"{job['task']} {job['method']} lr={job['lr']:g} seed={job['seed']}")
    print(f"done {job['task']} {job['method']} lr={job['lr']:g} seed={job['seed']}: val {result['validation']:.3f}",
          flush=True)
    return result


def tuning_records(records: list[dict], task: str, method: str) -> list[dict]:
    return [r for r in records if r["task"] == task and r["method"] == method and r["seed"] == SEEDS[0]]


def chosen_lr(records: list[dict], task: str, method: str) -> float:
    """Best validation accuracy at seed 0; ties go to the smaller rate."""
    return max(tuning_records(records, task, method), key=lambda r: (r["validation"], -r["lr"]))["lr"]


def edge_jobs(records: list[dict]) -> list[dict]:
    """One rate beyond the grid for a (task, method) whose best rate is the lowest or highest it tried."""
    jobs = []
    for task in TASKS:
        for method in METHODS:
            tried = sorted(r["lr"] for r in tuning_records(records, task, method))
            best = chosen_lr(records, task, method)
            beyond = [lr for lr in LR_EDGES if (best == tried[0] and lr < best) or (best == tried[-1] and lr > best)]
            jobs += [dict(task=task, method=method, lr=lr, seed=SEEDS[0]) for lr in beyond if lr not in tried]
    return jobs


def accuracy_mode(args) -> None:
    budgets()
    log = harness.RunLog(WORK / "runs.jsonl", identity=IDENTITY)
    grid = harness.job_grid(task=tuple(TASKS), method=METHODS, lr=LR_GRID, seed=(SEEDS[0],))
    harness.run_jobs(grid, log, _child, workers=args.workers)
    harness.run_jobs(edge_jobs(log.records()), log, _child, workers=args.workers)
    records = log.records()
    finals = [dict(task=t, method=m, lr=chosen_lr(records, t, m), seed=s)
              for t in TASKS for m in METHODS for s in SEEDS[1:]]
    harness.run_jobs(finals, log, _child, workers=args.workers)


# --- step time and memory -----------------------------------------------------------------------------------
def _contender(task, label: str, params: dict):
    from deltatune.recipe import prepare_model

    model, _ = prepare_model(task, METHOD_OF[label], params, seed=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer


def _step(model, optimizer, batch: dict) -> None:
    from deltatune.data.datasets import model_inputs

    logits = model(**model_inputs(batch))
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _batch(task) -> dict:
    return task.collate([task.train[i] for i in range(BATCH)])


def timing_mode(args) -> None:
    """Median whole-step time per contender, alternated step by step in one process, twice."""
    from deltatune.data import load_task

    torch.set_num_threads(args.threads)
    rows = []
    for task_name, chosen in budgets().items():
        task = load_task(task_name, **_load_args(task_name))
        batch = _batch(task)
        for repeat in range(REPEATS):
            contenders = {label: _contender(task, label, chosen[label]["params"]) for label in METHODS}
            timers = {label: harness.StepTimer() for label in METHODS}
            for _ in range(WARMUP + TIMED_STEPS):
                for label, (model, optimizer) in contenders.items():
                    timers[label].on_step_begin()
                    _step(model, optimizer, batch)
                    timers[label].on_step_end()
            medians = {label: statistics.median(t.seconds[WARMUP:]) for label, t in timers.items()}
            rows.append({"task": task_name, "repeat": repeat, "median_seconds": medians,
                         "ratio_to_lora": {k: v / medians["lora"] for k, v in medians.items()},
                         "raw_seconds": {k: t.seconds[WARMUP:] for k, t in timers.items()}})
            print(json.dumps(rows[-1]["ratio_to_lora"]), flush=True)
    harness.write_json(WORK / "timing.json", {"rows": rows, "environment": harness.environment(threads=args.threads)})


def _resident_mb() -> float:
    """This process's current resident set (Linux /proc), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _release_free_heap() -> None:
    """Return freed heap pages to the system (glibc), so the baseline is what is still in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline then includes free heap (a smaller difference)
        pass


def memory_one(args) -> None:
    """Train one contender MEMORY_STEPS steps in this fresh process: the resident memory a training step adds
    above the loaded model (sampled after forward, backward and the optimizer step), and the peak RSS."""
    from deltatune.data import load_task
    from deltatune.data.datasets import model_inputs

    torch.set_num_threads(1)
    task = load_task(args.task, **_load_args(args.task))
    batch = _batch(task)
    model, optimizer = _contender(task, args.method, budgets()[args.task][args.method]["params"])
    _release_free_heap()
    baseline, samples = _resident_mb(), []
    for _ in range(MEMORY_STEPS):
        loss = torch.nn.functional.cross_entropy(model(**model_inputs(batch)), batch["labels"])
        samples.append(_resident_mb())
        loss.backward()
        samples.append(_resident_mb())
        optimizer.step()
        samples.append(_resident_mb())
        optimizer.zero_grad(set_to_none=True)
    harness.emit({"task": args.task, "method": args.method, "baseline_mb": baseline,
                  "step_mb": max(samples) - baseline,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def memory_mode(args) -> None:
    rows = [harness.run_child(harness.script_command(__file__, "memory-one", "--task", t, "--method", m))
            for t in TASKS for m in METHODS]
    harness.write_json(WORK / "memory.json", {"rows": rows, "environment": harness.environment(threads=1)})


# --- report -------------------------------------------------------------------------------------------------
def report_mode(args) -> None:
    records = harness.RunLog(WORK / "runs.jsonl", identity=IDENTITY).records()
    chosen = budgets()
    timing = _read_json(WORK / "timing.json", {"rows": [], "environment": harness.environment()})
    memory = _read_json(WORK / "memory.json", {"rows": []})
    lines = ["# Bottleneck adapters vs LoRA at matched trainable counts", "",
             f"Made by `benchmarks/adapters.py` ({harness.environment_line(timing['environment'])})", "",
             "    flock /work/wt/heavy.lock python benchmarks/adapters.py all --workers 2", "",
             "Protocol: the module docstring of benchmarks/adapters.py. Test accuracy (%) mean ± std over seeds "
             f"{', '.join(map(str, SEEDS))} at each method's rate (best of {', '.join(f'{lr:g}' for lr in LR_GRID)} "
             "on validation with seed 0, extended by one step at an edge). Step time: median whole training step, "
             "alternated in one process, ratio to LoRA (two repeats); step memory: resident memory a training step "
             "adds above the loaded model, in a fresh process per contender, ratio to LoRA.", ""]
    for task in TASKS:
        lines += _task_table(task, records, chosen[task], timing["rows"], memory["rows"])
    lines += ["## Raw", "", "Every run (task, method, lr, seed, validation, test):", "", "```"]
    lines += [json.dumps({k: r[k] for k in (*IDENTITY, "validation", "test", "trainable")}) for r in records]
    lines += ["```", "", "Step times (s) per repeat:", "", "```"]
    lines += [json.dumps({"task": r["task"], "repeat": r["repeat"], "median_seconds": r["median_seconds"]})
              for r in timing["rows"]]
    lines += ["```", "", "Memory (MB: baseline after loading, step_mb added by a step, process peak RSS):", "", "```"]
    lines += [json.dumps(r) for r in memory["rows"]] + ["```", ""]
    path = RESULTS / "adapters.md"
    notes = path.read_text().split("\n## Reading", 1)[1] if path.exists() and "\n## Reading" in path.read_text() else ""
    harness.write_report(path, "\n".join(lines) + ("\n## Reading" + notes if notes else ""))
    print(path)


def _read_json(path: Path, missing: dict) -> dict:
    return json.loads(path.read_text()) if path.exists() else missing


def _task_table(task: str, records: list[dict], chosen: dict, timing: list[dict], memory: list[dict]) -> list[str]:
    rows = ["| method | trainable (target) | params | lr | test acc | step time / LoRA | step memory / LoRA |",
            "|---|---|---|---|---|---|---|"]
    step_mb = {m["method"]: m["step_mb"] for m in memory if m["task"] == task}
    for method in METHODS:
        tuned = tuning_records(records, task, method)
        lr = chosen_lr(records, task, method) if tuned else None
        tests = [r["test"] for r in records if r["task"] == task and r["method"] == method and r["lr"] == lr]
        ratios = " / ".join(f"{t['ratio_to_lora'][method]:.2f}" for t in timing if t["task"] == task) or "–"
        memory_ratio = f"{step_mb[method] / step_mb['lora']:.2f}" if method in step_mb and "lora" in step_mb else "–"
        params = {k: v for k, v in chosen[method]["params"].items() if k != "targets"}
        rate = "–" if lr is None else f"{lr:g}"
        rows.append(f"| {method} | {chosen[method]['count']:,} ({chosen[method]['target']:,}) | {params} | {rate} | "
                    f"{harness.mean_std(tests)} (n={len(tests)}) | {ratios} | {memory_ratio} |")
    return [f"## {task}", ""] + rows + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("all", "accuracy", "timing", "memory", "report", "one", "memory-one"))
    parser.add_argument("job", nargs="?")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--task")
    parser.add_argument("--method")
    args = parser.parse_args(argv)
    if args.mode == "one":
        return harness.emit(run_one(json.loads(args.job)))
    if args.mode == "memory-one":
        return memory_one(args)
    modes = {"accuracy": accuracy_mode, "timing": timing_mode, "memory": memory_mode, "report": report_mode}
    # timing and memory first: minutes, while the accuracy grid is the long part (resumable, run by run)
    for mode in (("timing", "memory", "accuracy", "report") if args.mode == "all" else (args.mode,)):
        modes[mode](args)


if __name__ == "__main__":
    sys.exit(main())

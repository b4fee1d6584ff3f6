"""The audio-transformer PETL study (other.md §6, Cappellazzo et al. 2023) at small scale, on the SpeechAST tasks.

    flock /work/wt/heavy.lock python benchmarks/audio_petl.py [--out benchmarks/results/audio_petl] [--seeds 3]

The paper compares, on a frozen AST, bottleneck adapters (Pfeiffer: one per block at the FFN; Houlsby: two, at
attention and FFN; sequential or parallel), prompt tuning (VPT-style, deep by default) and LoRA on Wq, Wv, with full
fine-tuning and a linear probe as references. Its findings (our notes, §6 e): (1) adapters beat prompt tuning and
LoRA (v1 abstract); (2) adapters and LoRA beat prompts, adapters are better few-shot (v2/v3); (3) parallel adapters
work well without an extra residual (README). Here: SpeechAST (pretrained on 25 synthesized keywords), tasks
`speech-keywords-novel` (10 unseen words, held-out speakers) and `speech-voices` (12 voices, held-out words),
few-shot (TRAIN_PER_CLASS clips per class) so that the study takes minutes.

Budgets: every PETL method at the trainable count of Pfeiffer with reduction factor 16 (bottleneck 8 at hidden 128:
the paper's r = 768 / 96 = 8), matched by `deltatune.bench.budget.match_budget` (adapters `bottleneck_size`, LoRA
`rank`, VPT `num_tokens`); the head is trained by every method and left out of the count. Full fine-tuning and
the probe at their natural sizes. lr per (task, method): the best validation accuracy at seed 0 over one grid
(LR_GRIDS: the paper's rates 5e-3 adapters / LoRA, 1e-2 prompts, 5e-5 full FT, 1e-3 linear sit in them); then
every seed at that rate. recipe.finetune (AdamW, batch 32, linear decay). Writes <out>.jsonl (one row per run;
finished runs are skipped, so a re-run resumes) and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from deltatune.bench import harness  # noqa: E402

TASKS = {"speech-keywords-novel": 10, "speech-voices": 12}  # task -> classes
TRAIN_PER_CLASS, EPOCHS, BATCH = 12, 6, 32
# every arm chose the top of the first 3-point grids (1e-3..1e-2 / 3e-3..3e-2 / full 3e-5..3e-4): extended by two
# steps past that edge, so the rate chosen on validation lies inside the grid
ADAPTER_GRID, PROMPT_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
METHODS = {  # label -> (method, fixed params, lr grid, budget-matched?)
    "pfeiffer-seq": ("bottleneck_adapter", {"targets": "pfeiffer"}, ADAPTER_GRID, True),
    "houlsby-seq": ("bottleneck_adapter", {"targets": "houlsby"}, ADAPTER_GRID, True),
    "pfeiffer-par": ("parallel_adapter", {"targets": "pfeiffer"}, ADAPTER_GRID, True),
    "lora": ("lora", {}, ADAPTER_GRID, True),
    "vpt-deep": ("vpt", {"deep": True, "patch_fan_in": 64}, PROMPT_GRID, True),
    "vpt-shallow": ("vpt", {"deep": False, "patch_fan_in": 64}, PROMPT_GRID, True),
    "full": ("full", {}, (3e-5, 1e-4, 3e-4, 1e-3, 3e-3), False),
    "probe": ("probe", {}, PROMPT_GRID, False),
}


def budgets(task_name: str) -> dict[str, dict]:
    """Each matched method's params on the task: its budget knob set to Pfeiffer's reduction-16 count."""
    from deltatune.bench.budget import adapter_count, match_budget, task_counter
    from deltatune.data import load_task
    from deltatune.recipe import prepare_model

    task = load_task(task_name)
    pfeiffer, _ = prepare_model(task, "bottleneck_adapter", {"targets": "pfeiffer", "reduction_factor": 16.0}, 0)
    target = adapter_count(pfeiffer, tuple(task.extra_trainable))
    chosen = {}
    for label, (method, fixed, _, matched) in METHODS.items():
        if not matched:
            chosen[label] = dict(fixed)
            continue
        match = match_budget(method, target, task_counter(task, method, common=fixed, batch_size=BATCH))
        chosen[label] = {**fixed, **match.params()}
        if method == "lora":
            chosen[label]["alpha"] = 2.0 * chosen[label]["rank"]
    return chosen


class Log:
    """The runs done so far (jsonl), so a re-run continues where it stopped; budgets cached in the first rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def _append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def params(self, task: str) -> dict[str, dict]:
        for row in self.rows:
            if row.get("budgets") == task:
                return row["params"]
        self._append({"budgets": task, "params": budgets(task)})
        return self.rows[-1]["params"]

    def get(self, task: str, label: str, lr: float, seed: int) -> dict:
        for row in self.rows:
            if (row.get("task"), row.get("method"), row.get("lr"), row.get("seed")) == (task, label, lr, seed):
                return row
        self._append(run(task, label, self.params(task)[label], lr, seed))
        return self.rows[-1]


def run(task: str, label: str, params: dict, lr: float, seed: int) -> dict:
    from deltatune.recipe import finetune

    started = time.perf_counter()
    result = finetune(task, METHODS[label][0], dict(params), epochs=EPOCHS, lr=lr, batch_size=BATCH,
                      train_size=TRAIN_PER_CLASS * TASKS[task], seed=seed, progress=False)
    return {"task": task, "method": label, "lr": lr, "seed": seed, "params": params,
            "validation": result.validation_score, "test": result.test_score,
            "trainable": result.trainable.trainable, "seconds": round(time.perf_counter() - started, 1)}


def best_lr(log: Log, task: str, label: str) -> float:
    """Best validation accuracy at seed 0 over the grid; ties go to the smaller rate."""
    return max(METHODS[label][2], key=lambda lr: (log.get(task, label, lr, 0)["validation"], -lr))


def summary(log: Log, seeds: int) -> tuple[str, dict]:
    lines = ["| task | method | params | lr (val.; grid) | trainable (with head) | validation | test mean ± std | "
             "seeds |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    means = {}
    for task in TASKS:
        for label in METHODS:
            lr = best_lr(log, task, label)
            rows = [log.get(task, label, lr, seed) for seed in range(seeds)]
            tests = [r["test"] for r in rows]
            means[task, label] = statistics.mean(tests)
            grid = METHODS[label][2]
            edge = " (edge)" if lr in (grid[0], grid[-1]) else ""
            knobs = ", ".join(f"{k}={v}" for k, v in rows[0]["params"].items()) or "-"
            lines.append(f"| {task} | {label} | {knobs} | {lr:g}{edge} | {rows[0]['trainable']:,} | "
                         f"{rows[0]['validation']:.3f} | {statistics.mean(tests):.3f} ± "
                         f"{statistics.stdev(tests) if len(tests) > 1 else 0:.3f} | {len(tests)} |")
    return "\n".join(lines) + "\n", means


def _holds(flag: bool) -> str:
    return "holds" if flag else "does not hold"


def verdicts(means: dict) -> str:
    lines = []
    for task in TASKS:
        m = {label: means[task, label] for label in METHODS}
        best_adapter = max(("pfeiffer-seq", "houlsby-seq", "pfeiffer-par"), key=m.get)
        best_prompt = max(("vpt-deep", "vpt-shallow"), key=m.get)
        adapters_win = m[best_adapter] > max(m[best_prompt], m["lora"])
        lines.append(
            f"- {task}: adapters > prompt tuning and LoRA (v1) {_holds(adapters_win)}"
            f" (best adapter {best_adapter} {m[best_adapter]:.3f}, {best_prompt} {m[best_prompt]:.3f}, LoRA "
            f"{m['lora']:.3f}); adapters and LoRA > prompts (v2/v3) "
            f"{_holds(min(m[best_adapter], m['lora']) > m[best_prompt])}; adapters >= LoRA few-shot (v2/v3) "
            f"{_holds(m[best_adapter] >= m['lora'])}; parallel adapter >= sequential Pfeiffer (README) "
            f"{_holds(m['pfeiffer-par'] >= m['pfeiffer-seq'])} ({m['pfeiffer-par']:.3f} vs {m['pfeiffer-seq']:.3f}); "
            f"references: full {m['full']:.3f}, probe {m['probe']:.3f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/audio_petl")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    log = Log(out.with_suffix(".jsonl"))
    table, means = summary(log, args.seeds)
    header = (f"# Audio PETL study on SpeechAST (other.md §6)\n\nCommand: `flock /work/wt/heavy.lock python "
              f"benchmarks/audio_petl.py` (torch {torch.__version__}, {args.threads} threads, "
              f"{time.strftime('%Y-%m-%d')}). {TRAIN_PER_CLASS} clips per class, {EPOCHS} epochs, AdamW batch {BATCH};"
              f" lr chosen on the full validation split at seed 0 from each method's grid; test = the full test "
              f"split; mean ± std over seeds 0-{args.seeds - 1}. Raw runs: audio_petl.jsonl.\n\n")
    report = out.with_suffix(".md")  # atomic; the hand-written reading survives a re-run
    harness.write_report(report, header + table + "\n" + verdicts(means))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""VPT-deep vs VPT-shallow vs full fine-tuning vs linear probe on the glyph ViT tasks (issue 13).

    flock /work/wt/heavy.lock python benchmarks/vpt.py [--out benchmarks/results/vpt] [--seeds 3]

The claim (other.md §5.1, at small scale): VPT-deep >= VPT-shallow, and VPT >= linear probe; full fine-tuning for
reference. Protocol (BENCHMARKING.md): per task and method, the lr is chosen on validation (seed 0) from one small
grid, then every seed runs at that lr; test accuracy is the mean ± std over seeds. Tasks: glyphs-novel-vit and
handwritten-vit, few-shot (10 images per class), so that the table takes minutes. VPT: 5 tokens (VPT's default),
xavier-uniform init over the 1x4x4 patch fan-in, the backbone in eval mode (KeepsBaseInEval), head trained.
Writes <out>.jsonl (one row per run, resumable: finished runs are skipped) and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deltatune.bench import harness
from deltatune.recipe import finetune

TASKS = {"glyphs-novel-vit": 24 * 10, "handwritten-vit": 10 * 10}  # task -> train images (10 per class)
METHODS = {  # label -> (method, params, lr grid)
    "vpt-deep": ("vpt", {"deep": True, "patch_fan_in": 16}, (3e-3, 1e-2, 3e-2)),
    "vpt-shallow": ("vpt", {"deep": False, "patch_fan_in": 16}, (3e-3, 1e-2, 3e-2)),
    "full": ("full", {}, (1e-4, 3e-4, 1e-3)),
    "probe": ("probe", {}, (3e-3, 1e-2, 3e-2)),
}
EPOCHS, VALIDATION, TEST = 8, 240, 480


def run(task: str, label: str, lr: float, seed: int) -> dict:
    method, params, _ = METHODS[label]
    started = time.perf_counter()
    result = finetune(task, method, dict(params), epochs=EPOCHS, lr=lr, train_size=TASKS[task], seed=seed,
                      progress=False, validation_size=VALIDATION, test_size=TEST)
    return {"task": task, "method": label, "lr": lr, "seed": seed, "validation": result.validation_accuracy,
            "test": result.test_accuracy, "trainable": result.trainable.trainable,
            "seconds": round(time.perf_counter() - started, 1)}


class Log:
    """The runs done so far (jsonl), so a re-run continues where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def get(self, task: str, label: str, lr: float, seed: int) -> dict:
        for row in self.rows:
            if (row["task"], row["method"], row["lr"], row["seed"]) == (task, label, lr, seed):
                return row
        row = run(task, label, lr, seed)
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row


def best_lr(log: Log, task: str, label: str) -> float:
    grid = METHODS[label][2]
    return max(grid, key=lambda lr: log.get(task, label, lr, 0)["validation"])


def summary(log: Log, seeds: int) -> tuple[str, dict]:
    lines = ["| task | method | lr (val.) | trainable | test mean ± std | seeds |",
             "| --- | --- | --- | --- | --- | --- |"]
    means = {}
    for task in TASKS:
        for label in METHODS:
            lr = best_lr(log, task, label)
            rows = [log.get(task, label, lr, seed) for seed in range(seeds)]
            tests = [r["test"] for r in rows]
            means[task, label] = statistics.mean(tests)
            lines.append(f"| {task} | {label} | {lr:g} | {rows[0]['trainable']:,} | {statistics.mean(tests):.3f} ± "
                         f"{statistics.stdev(tests) if len(tests) > 1 else 0:.3f} | {len(tests)} |")
    return "\n".join(lines) + "\n", means


def verdicts(means: dict) -> str:
    lines = []
    for task in TASKS:
        deep, shallow, probe = (means[task, m] for m in ("vpt-deep", "vpt-shallow", "probe"))
        lines.append(f"- {task}: VPT-deep >= VPT-shallow {'holds' if deep >= shallow else 'does not hold'} "
                     f"({deep:.3f} vs {shallow:.3f}); VPT-deep >= linear probe "
                     f"{'holds' if deep >= probe else 'does not hold'} ({deep:.3f} vs {probe:.3f}); full fine-tune "
                     f"{means[task, 'full']:.3f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/vpt")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    log = Log(out.with_suffix(".jsonl"))
    table, means = summary(log, args.seeds)
    header = (f"# VPT on the glyph ViT tasks\n\nCommand: `flock /work/wt/heavy.lock python benchmarks/vpt.py` (torch "
              f"{torch.__version__}, {args.threads} threads, {time.strftime('%Y-%m-%d')}). {EPOCHS} epochs, 10 "
              f"images per class, AdamW batch 32; lr chosen on validation ({VALIDATION} images) at seed 0 from "
              f"each method's grid; test on {TEST} images. Raw runs: vpt.jsonl.\n\n")
    report = out.with_suffix(".md")  # atomic; the hand-written reading survives a re-run
    harness.write_report(report, header + table + "\n" + verdicts(means))
    return 0


if __name__ == "__main__":
    sys.exit(main())

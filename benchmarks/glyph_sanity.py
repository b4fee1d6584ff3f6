"""Sanity numbers of the glyph-backbone tasks: a linear probe and one LoRA run per task (deltatune.recipe).

    flock /work/wt/heavy.lock python benchmarks/glyph_sanity.py [--out benchmarks/results/glyph_sanity]

Recipe: the `deltatune train` defaults (AdamW, batch 32, seed 0; probe lr 5e-3, LoRA rank 8 lr 2e-3 on the
task's default targets); epochs: 2 for the two 62-class tasks, which train on a 4,000-image stratified subset of
their 14,880 (seed 0), 1 for glyphs-novel, 5 for handwritten (and a 100-image few-shot LoRA row, 10 epochs), so
that the whole table takes minutes on a shared CPU. Writes
<out>.jsonl (one row per run) and <out>.md (the table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from deltatune.data import evaluate_accuracy, load_task
from deltatune.data.glyph_tasks import glyph_task_names
from deltatune.recipe import finetune

EPOCHS = {"glyphs": 2, "glyphs-rotated": 2, "glyphs-novel": 1, "handwritten": 5}
FEW_SHOT = {"handwritten": (100, 10)}  # (train images, epochs)
TRAIN_SIZE = {"glyphs": 4000, "glyphs-rotated": 4000}


def runs() -> list[dict]:
    """Every (task, method, train_size) run of the table, in order."""
    planned = []
    for task in glyph_task_names():
        base = task.rpartition("-")[0]
        for method in ("probe", "lora"):
            planned.append({"task": task, "method": method, "epochs": EPOCHS[base],
                            "train_size": TRAIN_SIZE.get(base)})
        if base in FEW_SHOT:
            size, epochs = FEW_SHOT[base]
            planned.append({"task": task, "method": "lora", "epochs": epochs, "train_size": size})
    return planned


def base_accuracy(task_name: str) -> float | None:
    """Test accuracy of the task's model as built (pretrained head rows), before any training; None if fresh."""
    task = load_task(task_name)
    torch.manual_seed(0)
    model = task.build_model()
    if model.classifier.out_features == 62 or task_name.startswith("handwritten"):
        return evaluate_accuracy(model, task.test, batch_size=512)
    return None


def run_one(plan: dict) -> dict:
    started = time.perf_counter()
    result = finetune(plan["task"], plan["method"], epochs=plan["epochs"], train_size=plan["train_size"],
                      progress=False)
    return {**plan, "validation": result.validation_accuracy, "test": result.test_accuracy,
            "trainable": result.trainable.trainable, "seconds": round(time.perf_counter() - started, 1)}


def table(rows: list[dict], bases: dict[str, float | None]) -> str:
    lines = ["| task | method | train images | epochs | trainable | validation | test | before training | s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        before = bases.get(row["task"])
        lines.append(
            f"| {row['task']} | {row['method']} | {row['train_size'] or 'all'} | {row['epochs']} | "
            f"{row['trainable']:,} | {row['validation']:.3f} | {row['test']:.3f} | "
            f"{'-' if before is None else f'{before:.3f}'} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/glyph_sanity")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bases = {task: base_accuracy(task) for task in glyph_task_names()}
    rows = []
    out = Path(args.out)
    with open(out.with_suffix(".jsonl"), "w", encoding="utf-8") as handle:
        for plan in runs():
            rows.append(run_one(plan))
            handle.write(json.dumps(rows[-1]) + "\n")
            handle.flush()
            print(json.dumps(rows[-1]), flush=True)
    header = (f"# Glyph tasks: sanity numbers\n\nCommand: `python benchmarks/glyph_sanity.py` (torch "
              f"{torch.__version__}, {args.threads} threads). 'before training': test accuracy of the task's "
              "model as built (pretrained head rows; '-' for a fresh head).\n\n")
    out.with_suffix(".md").write_text(header + table(rows, bases), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

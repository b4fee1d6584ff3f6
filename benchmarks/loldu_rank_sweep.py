"""LoLDU's accuracy-vs-parameters claim at small scale, on wordnet-nouns (all-MiniLM-L6-v2).

The paper (Shi et al., 2024, Fig. 1 / Tables 1-2) claims LoLDU reaches accuracy close to LoRA's with a small
fraction of its trainable parameters, and that accuracy grows with the rank r of the trained diagonal. This runs
LoLDU at r = 1, 8, 64 and full rank, LoRA at ranks 1 and 8, and the head-only probe, on the task's default
targets (query, value), 3 seeds each, every configuration at every rate of one grid; the table reports, per
configuration, the rate with the best mean validation accuracy and its test accuracy (mean ± std over seeds).
Recipe: `deltatune compare` with --train-size 1000 --epochs 2 --max-length 16 (the head is trained in every run).

    HF_HUB_OFFLINE=1 flock /work/wt/heavy.lock .venv/bin/python benchmarks/loldu_rank_sweep.py \
        --out runs/loldu_sweep --report benchmarks/results/loldu_rank_sweep
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from deltatune.bench import harness
from deltatune.compare import compare

TASK, SEEDS = "wordnet-nouns", (0, 1, 2)
TRAIN = {"train_size": 1000, "epochs": 2, "max_length": 16}
GRID = (3e-3, 1e-2, 3e-2, 1e-1)
# (label, method, config) — LoLDU's full rank is its default (rank=None)
CONFIGS = (
    ("probe", "probe", {}),
    ("LoLDU r=1", "loldu", {"rank": 1}),
    ("LoLDU r=8", "loldu", {"rank": 8}),
    ("LoLDU r=64", "loldu", {"rank": 64}),
    ("LoLDU full", "loldu", {}),
    ("LoRA r=1", "lora", {"rank": 1}),
    ("LoRA r=8", "lora", {"rank": 8}),
)


def folder(out: Path, label: str, lr: float) -> Path:
    return out / f"{label.replace(' ', '').replace('=', '')}-lr{lr:g}"


def sweep(out: Path) -> list[dict]:
    """Every configuration at every rate (finished runs are reused); one row per (configuration, rate)."""
    rows = []
    for label, method, config in CONFIGS:
        for lr in GRID:
            summary, = compare(TASK, [method], {method: config}, SEEDS, out_dir=folder(out, label, lr),
                               lr={method: lr}, **TRAIN)
            rows.append({"label": label, "lr": lr, "trainable": summary.trainable, "test": summary.test,
                         "validation": summary.validation})
    return rows


def best_by_validation(rows: list[dict]) -> list[dict]:
    """Per configuration, the row whose rate has the best mean validation accuracy (ties: the smaller rate)."""
    chosen = []
    for label, _, _ in CONFIGS:
        candidates = [row for row in rows if row["label"] == label]
        chosen.append(max(candidates, key=lambda row: (statistics.mean(row["validation"]), -row["lr"])))
    return chosen


def render(rows: list[dict], chosen: list[dict], env: dict) -> str:
    lora1 = next(row for row in chosen if row["label"] == "LoRA r=1")
    lines = ["# LoLDU accuracy vs trainable parameters (wordnet-nouns, all-MiniLM-L6-v2, query+value)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"Recipe: {TRAIN}, seeds {list(SEEDS)}, rate grid {list(GRID)} for every configuration, chosen on "
             "mean validation accuracy. Trainable counts include the 3,850-number head.", "",
             "| configuration | trainable | / LoRA r=1 | best lr | edge of grid? | validation % | test % |",
             "|---|---|---|---|---|---|---|"]
    for row in chosen:
        edge = "yes" if row["lr"] in (GRID[0], GRID[-1]) else ""
        lines.append(f"| {row['label']} | {row['trainable']:,} | {row['trainable'] / lora1['trainable']:.2f} | "
                     f"{row['lr']:g} | {edge} | {harness.mean_std(row['validation'])} | "
                     f"{harness.mean_std(row['test'])} |")
    lines += ["", "## Every rate (mean test %, mean validation % in parentheses)", "",
              "| configuration | " + " | ".join(f"lr {lr:g}" for lr in GRID) + " |", "|---" * (len(GRID) + 1) + "|"]
    for label, _, _ in CONFIGS:
        cells = [row for row in rows if row["label"] == label]
        lines.append(f"| {label} | " + " | ".join(
            f"{100 * statistics.mean(r['test']):.1f} ({100 * statistics.mean(r['validation']):.1f})"
            for r in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(chosen: list[dict]):
    figure, axes = harness.pyplot().subplots(figsize=(6, 4))
    for family, marker in (("LoLDU", "o"), ("LoRA", "s"), ("probe", "x")):
        rows = [row for row in chosen if row["label"].startswith(family)]
        axes.errorbar([row["trainable"] for row in rows], [100 * statistics.mean(row["test"]) for row in rows],
                      yerr=[statistics.stdev([100 * v for v in row["test"]]) for row in rows], marker=marker,
                      label=family, capsize=3)
        for row in rows:
            axes.annotate(row["label"].split(" ")[-1], (row["trainable"], 100 * statistics.mean(row["test"])),
                          textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes.set_xscale("log")
    axes.set(xlabel="trainable numbers (log)", ylabel="test accuracy %", title="wordnet-nouns, MiniLM")
    axes.legend()
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/loldu_sweep", help="run folders (finished runs are reused)")
    parser.add_argument("--report", default="benchmarks/results/loldu_rank_sweep", help="writes <report>.md/.png")
    args = parser.parse_args(argv)
    rows = sweep(Path(args.out))
    chosen = best_by_validation(rows)
    text = render(rows, chosen, harness.environment())
    report = f"{args.report}.md"
    harness.write_report(report, text, {Path(f"{args.report}.png"): plot(chosen)})
    print(text)


if __name__ == "__main__":
    sys.exit(main())

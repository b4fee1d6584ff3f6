"""TLoRA's ablation at small scale: T + Δ vs T alone vs Δ alone at (about) equal trainable counts, LoRA as a reference.

Task: `glyphs-novel-vit` (the shipped GlyphViT, its default targets: the 8 attention q/v projections, 128 × 128,
modes 4·4·8; the classifier head trains in every run). Variants per adapted module:
  T only      transform_rank 2, residual none                    384 numbers
  T + Δ       transform_rank 1 (Kronecker), tensor-ring rank 3   96 + 288 = 384
  Δ only      no transform, tensor-ring rank 4                    512 (rank 3.46 would match; rank 4 favours it)
  LoRA r=2    reference                                           512
Training: 1 epoch of the training split, batch 32, the recipe's defaults (`deltatune.recipe.finetune`). lr: the
best validation accuracy of {3e-3, 1e-2, 3e-2} with seed 0, then seeds 0, 1, 2 at that lr. Reported: the final
training loss (mean of the last 10 logged steps: the fit) and test accuracy, mean ± std over seeds.

    flock /work/wt/heavy.lock .venv/bin/python benchmarks/tlora_ablation.py > /tmp/tlora_ablation.log 2>&1
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from deltatune.bench import harness  # noqa: E402
from deltatune.recipe import finetune  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASK = "glyphs-novel-vit"
VARIANTS = {
    "T only": ("tlora", {"transform_rank": 2, "residual": "none"}),
    "T + Δ": ("tlora", {"transform_rank": 1, "rank": 3}),
    "Δ only": ("tlora", {"transform_rank": 0, "rank": 4}),
    "LoRA r=2": ("lora", {"rank": 2}),
}
LR_GRID = (3e-3, 1e-2, 3e-2)
SEEDS = (0, 1, 2)


def run(variant: str, lr: float, seed: int) -> dict:
    method, params = VARIANTS[variant]
    result = finetune(TASK, method, params, epochs=1, batch_size=32, lr=lr, seed=seed, progress=False)
    losses = [record["loss"] for record in result.history if "loss" in record]
    return {"variant": variant, "lr": lr, "seed": seed, "train_loss": statistics.fmean(losses[-10:]),
            "validation": result.validation_score, "test": result.test_score,
            "trainable": result.trainable.trainable, "seconds": result.seconds}


def _mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(records: list[dict], chosen: dict[str, float]) -> list[str]:
    lines = ["| variant | trainable | lr | train loss (fit) | test accuracy |", "|---|---|---|---|---|"]
    for variant in VARIANTS:
        rows = [r for r in records if r["variant"] == variant and r["lr"] == chosen[variant]]
        lines.append(f"| {variant} | {rows[0]['trainable']:,} | {chosen[variant]:g} | "
                     f"{_mean_std([r['train_loss'] for r in rows])} | {_mean_std([r['test'] for r in rows])} |")
    return lines


def main() -> None:
    torch.set_num_threads(2)
    start = time.time()
    records = [run(v, lr, 0) for v in VARIANTS for lr in LR_GRID]
    chosen = {v: max((r for r in records if r["variant"] == v), key=lambda r: r["validation"])["lr"]
              for v in VARIANTS}
    records += [run(v, chosen[v], seed) for v in VARIANTS for seed in SEEDS[1:]]
    harness.write_json(RESULTS / "tlora_ablation.json", records)
    minutes = (time.time() - start) / 60
    text = ["# TLoRA ablation: T + Δ vs T alone vs Δ alone (glyph ViT)", "", __doc__.strip(), "",
            f"Date {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, 2 threads, "
            f"{minutes:.1f} min in all. Raw runs: tlora_ablation.json.", "", *table(records, chosen), ""]
    report = RESULTS / "tlora_ablation.md"  # atomic; the hand-written reading survives a re-run
    harness.write_report(report, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()

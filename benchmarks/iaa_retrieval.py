"""Connected vs scattered PEFT modules for dense retrieval ("Scattered or Connected?", CIKM 2022; methods/iaa.py).

The paper's claim: joining per-layer (inside) modules by aside modules into one pathway beats scattered modules
of the same size and converges faster, reaching full fine-tuning. Here on `gloss-retrieval` (a WordNet
definition -> its lemma among 2.8k lemmas, shared MiniLM bi-encoder, in-batch InfoNCE, MRR@10): IAA connected
(inside r=8 after each FFN output + aside r=8 around each block) against scattered inside modules at r=16 (the
same count within 3 %), full fine-tuning, and the zero-shot encoder. Every arm at every rate of its grid, 3
seeds, 1 epoch of the 2,376 training pairs at batch 32 (74 steps); the rate is chosen on mean final validation MRR@10.
Validation MRR@10 is also read every EVERY steps (the convergence curve). The wiring of IAA is OUR READING
(the paper's section on it could not be read): see methods/iaa.py.

    HF_HUB_OFFLINE=1 flock /work/wt/heavy.lock .venv/bin/python benchmarks/iaa_retrieval.py \
        --out runs/iaa_retrieval --report benchmarks/results/iaa_retrieval
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from deltatune.bench import harness
from deltatune.core.atomic import atomic_write_text
from deltatune.data import load_task

TASK, SEEDS, EPOCHS, BATCH, EVERY = "gloss-retrieval", (0, 1, 2), 1, 32, 25
ARMS: dict[str, tuple[str, dict[str, Any], tuple[float, ...]]] = {
    "connected (IAA)": ("iaa", {"bottleneck_size": 8, "aside_bottleneck_size": 8}, (3e-4, 1e-3, 3e-3)),
    "scattered": ("iaa", {"bottleneck_size": 16, "connected": False}, (3e-4, 1e-3, 3e-3)),
    "full fine-tune": ("full", {}, (1e-5, 3e-5, 1e-4)),
}


@functools.cache
def _task():
    return load_task(TASK)


class ValidationCurve:
    """Trainer callback: validation MRR@10 every `every` optimizer steps."""

    def __init__(self, every: int) -> None:
        self.every, self.points = every, []

    def on_step_end(self, model: torch.nn.Module, global_step: int, **_: Any) -> None:
        if global_step % self.every == 0:
            task = _task()
            self.points.append((global_step, task.scorer.metrics(model, task.validation)["mrr@10"]))


def run(job: dict[str, Any], out: Path) -> dict[str, Any]:
    import deltatune.recipe

    method, params, _ = ARMS[job["arm"]]
    curve = ValidationCurve(EVERY)
    result = deltatune.recipe.finetune(TASK, method, dict(params), epochs=EPOCHS, batch_size=BATCH, lr=job["lr"],
                                       seed=job["seed"], out_dir=out / f"{method}-{job['arm'][:4]}-{job['lr']:g}-"
                                       f"s{job['seed']}", callbacks=(curve,), progress=False)
    final = _task().scorer.metrics(result.model, _task().test)
    print(f"      {job['arm']} lr {job['lr']:g} seed {job['seed']}: test {final}", flush=True)
    return {**job, "validation": result.validation_score, "test": final, "curve": curve.points,
            "trainable": result.trainable.trainable, "seconds": result.seconds}


def zero_shot() -> dict[str, float]:
    torch.manual_seed(0)
    task = _task()
    return task.scorer.metrics(task.build_model(), task.test)


def chosen_rates(records: list[dict]) -> dict[str, float]:
    """Per arm, the rate with the best mean validation MRR@10 (ties: the smaller rate)."""
    best = {}
    for arm, (_, _, grid) in ARMS.items():
        means = {lr: statistics.mean(r["validation"] for r in records if r["arm"] == arm and r["lr"] == lr)
                 for lr in grid if any(r["arm"] == arm and r["lr"] == lr for r in records)}
        if means:
            best[arm] = max(means, key=lambda lr: (means[lr], -lr))
    return best


def _cells(records: list[dict], arm: str, lr: float) -> list[dict]:
    return [r for r in records if r["arm"] == arm and r["lr"] == lr]


def render(records: list[dict], zero: dict[str, float], env: dict) -> str:
    best = chosen_rates(records)
    lines = ["# Connected (IAA) vs scattered modules on gloss-retrieval (MiniLM bi-encoder)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"Recipe: {EPOCHS} epochs x 2,376 pairs, batch {BATCH}, seeds {list(SEEDS)}; rate per arm chosen on mean "
             "final validation MRR@10. Pool: all 2,832 lemmas. IAA's wiring is our reading (methods/iaa.py).", "",
             "| arm | trainable | lr | edge of grid? | val MRR@10 | test MRR@10 | test R@1 | test R@10 | "
             f"val MRR@10 at step {EVERY} | seconds |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| zero-shot | 0 | – | | – | {100 * zero['mrr@10']:.1f} | {100 * zero['recall@1']:.1f} | "
             f"{100 * zero['recall@10']:.1f} | – | – |"]
    for arm, lr in best.items():
        cells = _cells(records, arm, lr)
        grid = ARMS[arm][2]
        first = [r["curve"][0][1] for r in cells if r["curve"]]
        lines.append(
            f"| {arm} | {cells[0]['trainable']:,} | {lr:g} | {'yes' if lr in (grid[0], grid[-1]) else ''} | "
            f"{harness.mean_std([r['validation'] for r in cells])} | "
            f"{harness.mean_std([r['test']['mrr@10'] for r in cells])} | "
            f"{harness.mean_std([r['test']['recall@1'] for r in cells])} | "
            f"{harness.mean_std([r['test']['recall@10'] for r in cells])} | {harness.mean_std(first)} | "
            f"{statistics.mean(r['seconds'] for r in cells):.0f} |")
    lines += ["", "## Every rate (mean validation MRR@10 %)", "", "| arm | rates and scores |", "|---|---|"]
    for arm, (_, _, grid) in ARMS.items():
        scores = [f"{lr:g}: {100 * statistics.mean(r['validation'] for r in _cells(records, arm, lr)):.1f}"
                  for lr in grid if _cells(records, arm, lr)]
        lines.append(f"| {arm} | {', '.join(scores)} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict]):
    figure, axes = harness.pyplot().subplots(figsize=(6, 4))
    for arm, lr in chosen_rates(records).items():
        curves = [r["curve"] for r in _cells(records, arm, lr) if r["curve"]]
        steps = [step for step, _ in curves[0]]
        means = [100 * statistics.mean(curve[i][1] for curve in curves) for i in range(len(steps))]
        axes.plot(steps, means, marker="o", label=f"{arm} (lr {lr:g})")
    axes.set(xlabel="optimizer step", ylabel="validation MRR@10 %", title="gloss-retrieval, MiniLM (mean of seeds)")
    axes.legend()
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/iaa_retrieval", help="run folders and runs.jsonl (finished runs "
                        "are reused)")
    parser.add_argument("--report", default="benchmarks/results/iaa_retrieval", help="writes <report>.md/.png/.jsonl")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS), help="arms to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    log = harness.RunLog(out / "runs.jsonl", identity=("arm", "lr", "seed"))
    jobs = [{"arm": arm, "lr": lr, "seed": seed} for arm in args.arms for lr in ARMS[arm][2] for seed in SEEDS]
    harness.run_jobs(jobs, log, lambda job: run(job, out), describe=lambda job: f"{job}")
    records = log.records()
    text = render(records, zero_shot(), harness.environment())
    report = f"{args.report}.md"
    harness.write_report(report, text, {Path(f"{args.report}.png"): plot(records)})
    atomic_write_text(f"{args.report}.jsonl", (out / "runs.jsonl").read_text())  # the raw runs beside the table
    print(text)


if __name__ == "__main__":
    sys.exit(main())

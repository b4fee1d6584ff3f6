"""Progressive unfreezing vs all-at-once: the pretrained GlyphCNN with a fresh head on few-shot glyphs-novel.

    flock /work/wt/heavy.lock python benchmarks/progressive_unfreezing.py [--out <prefix>]

(default prefix benchmarks/results/progressive_unfreezing)

Protocol: task `glyphs-novel-cnn` (24 Greek letters the backbone never saw, a fresh 24-way head), `--train-size`
images drawn per seed (label-stratified), the fixed validation (720) and test (1,200) splits; every parameter
trained; AdamW, batch 32, linear decay, `--epochs` epochs. Arms: `all_at_once` (everything trainable from step
0) and `progressive` (`ProgressiveUnfreezing` over `blocks.0` ... `blocks.3`: the head alone for `--every`
epochs, then blocks.3, blocks.2, ... one more every `--every` epochs). Same steps for both. The learning rate
is tuned per arm on mean validation accuracy over the seeds (same grid); the table reports test accuracy at each
arm's chosen rate, mean ± std. Runs are logged in <out>.jsonl (resumable); <out>.md is written from it.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from deltatune.bench import harness
from deltatune.data import evaluate_accuracy, load_task
from deltatune.train import ProgressiveUnfreezing, TrainConfig, Trainer
from deltatune.train.unfreezing import child_prefixes

ARMS = ("all_at_once", "progressive")


def run(job: dict, settings: argparse.Namespace) -> dict:
    task = load_task(settings.task, train_size=settings.train_size, seed=job["seed"])
    torch.manual_seed(job["seed"])
    model = task.build_model()
    callbacks = []
    if job["arm"] == "progressive":
        callbacks.append(ProgressiveUnfreezing(model, child_prefixes(model, "blocks"), every=settings.every))
    config = TrainConfig(epochs=settings.epochs, batch_size=32, lr=job["lr"], seed=job["seed"], progress=False,
                         eval_every_epoch=False)
    result = Trainer(model, config, task.train, collate_fn=task.collate, callbacks=callbacks).train()
    return {**job, "train_loss": result.metrics.get("train_loss"),
            "validation": evaluate_accuracy(model, task.validation), "test": evaluate_accuracy(model, task.test)}


def chosen_lr(records: list[dict], arm: str) -> float:
    by_lr: dict[float, list[float]] = {}
    for record in records:
        if record["arm"] == arm:
            by_lr.setdefault(record["lr"], []).append(record["validation"])
    return max(sorted(by_lr), key=lambda lr: statistics.mean(by_lr[lr]))


def render(records: list[dict], settings: argparse.Namespace, env: dict) -> str:
    chosen = {arm: [r for r in records if r["arm"] == arm and r["lr"] == chosen_lr(records, arm)] for arm in ARMS}
    lines = [f"# Progressive unfreezing vs all-at-once ({settings.task}, GlyphCNN, full fine-tune)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"{settings.train_size} training images per seed, {settings.epochs} epochs, batch 32, AdamW, linear "
             f"decay; progressive: head only, then one more block (blocks.3 first) every {settings.every} epochs; "
             f"lr grid {settings.lrs} tuned per arm on mean validation accuracy; seeds {settings.seeds}.", "",
             "| arm | chosen lr | validation acc (%) | test acc (%) |", "| --- | --- | --- | --- |"]
    for arm, rows in chosen.items():
        lines.append(f"| {arm} | {rows[0]['lr']:g} | {harness.mean_std([r['validation'] for r in rows])} | "
                     f"{harness.mean_std([r['test'] for r in rows])} |")
    plain, progressive = ([r["test"] for r in chosen[arm]] for arm in ARMS)
    gain = statistics.mean(progressive) - statistics.mean(plain)
    noise = max(statistics.stdev(plain), statistics.stdev(progressive))
    verdict = "holds" if gain > noise else "does not hold" + (" (same direction, within the seed spread)"
                                                              if gain > 0 else "")
    lines += ["", f"Claim (gradual unfreezing beats all-at-once by more than the larger seed std): {verdict} "
              f"({100 * gain:+.1f} points).", "", "## Every run", "",
              "| arm | lr | seed | train loss | validation | test |", "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (r["arm"], r["lr"], r["seed"])):
        lines.append(f"| {r['arm']} | {r['lr']:g} | {r['seed']} | {r['train_loss']:.3f} | "
                     f"{100 * r['validation']:.1f} | {100 * r['test']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/progressive_unfreezing")
    parser.add_argument("--task", default="glyphs-novel-cnn")
    parser.add_argument("--train-size", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    settings = parser.parse_args(argv)
    torch.set_num_threads(settings.threads)
    env = harness.environment(threads=settings.threads)
    log = harness.RunLog(f"{settings.out}.jsonl", ("arm", "lr", "seed"))
    jobs = harness.job_grid(arm=ARMS, lr=settings.lrs, seed=settings.seeds)
    harness.run_jobs(jobs, log, lambda job: run(job, settings), describe=str)
    markdown = render(log.records(), settings, env)
    harness.write_report(f"{settings.out}.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Long-tail backdoor adjustment (Chen et al., ICML 2025): LA fine-tuning per backbone + the logit sum over backbones.

    /work/wt/slot env PYTHONPATH=src python benchmarks/longtail.py [--out benchmarks/results/longtail]

Protocol: task `glyphs-novel` (24 Greek letters never pretrained; fresh head) with a long-tailed training split
(`deltatune.data.long_tail.long_tailed`: n_c = floor(198 · 50^(−c/23)), 198 … 3 images, 1,232 in all, drawn with
the run's seed), the task's balanced validation (720) and test (1,200, 50 a class) splits. Two pretrained backbones,
the strata z: GlyphViT and GlyphCNN, each LoRA rank 8 on the task's default targets (ViT q_proj/v_proj, CNN every
conv) + the head; AdamW, batch 32, linear decay, `--epochs` epochs, one thread. Arms per backbone: `ce` (plain
cross-entropy) and `la` (logit-adjusted CE(z + log π), τ = 1, π the split's class frequencies); then
`logit_ensemble` (the sum of the two backbones' logits, the paper's test-time backdoor adjustment) of the `ce`
models and of the `la` models. Phase 1 tunes the rate per (backbone, loss) on seed 0's validation accuracy (the
validation split is balanced, so this is the class-mean accuracy); phase 2 trains every seed at the chosen rates.
Test accuracy overall and per class group (many > 100 training images, medium 20-100, few < 20; the mean of
per-class accuracies), mean ± std over seeds. Runs are logged in <out>.jsonl (resumable); <out>.md and
<out>_groups.png are written from it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from deltatune.bench import harness
from deltatune.data import load_task
from deltatune.data.long_tail import GROUPS, group_accuracies, long_tailed, shot_groups
from deltatune.recipe import prepare_model
from deltatune.train import TrainConfig, Trainer
from deltatune.train.long_tail import LogitAdjustedLoss, logit_ensemble, model_logits

BACKBONES = ("vit", "cnn")
LOSSES = ("ce", "la")
ENSEMBLE = "ensemble"
COLUMNS = ("overall", *GROUPS)


def lt_task(settings: argparse.Namespace, backbone: str, seed: int):
    return long_tailed(load_task(f"{settings.task}-{backbone}"), settings.ratio, seed=seed)


def train_one(settings: argparse.Namespace, backbone: str, loss: str, lr: float, seed: int):
    """A LoRA model of `backbone` trained on the seed's long-tailed split with `loss`; (model, task, seconds)."""
    task = lt_task(settings, backbone, seed)
    model, _ = prepare_model(task, "lora", {"rank": settings.rank}, seed)
    loss_fn = LogitAdjustedLoss.from_labels(task.train.labels, task.num_classes) if loss == "la" else None
    config = TrainConfig(epochs=settings.epochs, batch_size=32, lr=lr, seed=seed, progress=False,
                         eval_every_epoch=False)
    started = time.perf_counter()
    Trainer(model, config, task.train, loss_fn=loss_fn, collate_fn=task.collate).train()
    return model, task, time.perf_counter() - started


def scores(logits: torch.Tensor, labels: torch.Tensor, train_counts: list[int]) -> dict[str, float]:
    return group_accuracies(logits.argmax(1), labels, train_counts)


def tune(job: dict, settings: argparse.Namespace) -> dict:
    model, task, seconds = train_one(settings, job["backbone"], job["loss"], job["lr"], job["seed"])
    counts = torch.bincount(task.train.labels, minlength=task.num_classes).tolist()
    return {**job, "validation": scores(model_logits(model, task.validation), task.validation.labels, counts),
            "seconds": round(seconds, 1)}


def final(job: dict, settings: argparse.Namespace, rates: dict[str, float]) -> dict:
    """Both backbones with `job['loss']` at their chosen rates, each alone and their logit ensemble, on test."""
    models, test, seconds, spread = [], {}, {}, {}
    for backbone in BACKBONES:
        model, task, seconds[backbone] = train_one(settings, backbone, job["loss"], rates[backbone], job["seed"])
        counts = torch.bincount(task.train.labels, minlength=task.num_classes).tolist()
        logits = model_logits(model, task.test)
        test[backbone] = scores(logits, task.test.labels, counts)
        spread[backbone] = float(logits.std(dim=1).mean())  # how strongly each stratum votes in the plain sum
        models.append(model)
    test[ENSEMBLE] = scores(logit_ensemble(models, task.test), task.test.labels, counts)
    return {**job, "rates": rates, "train_counts": counts, "test": test, "logit_std": spread,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def chosen_rates(records: list[dict], loss: str) -> dict[str, float]:
    """Per backbone, the rate of the grid with the best validation accuracy for `loss` (ties: the smaller)."""
    rates = {}
    for backbone in BACKBONES:
        rows = sorted((r for r in records if r["phase"] == "tune" and r["backbone"] == backbone
                       and r["loss"] == loss), key=lambda r: r["lr"])
        rates[backbone] = max(rows, key=lambda r: r["validation"]["overall"])["lr"]
    return rates


def rate_key(rates: dict[str, float]) -> str:
    return ",".join(f"{backbone}={rates[backbone]:g}" for backbone in BACKBONES)


def finals(records: list[dict], loss: str) -> list[dict]:
    key = rate_key(chosen_rates(records, loss))
    return sorted((r for r in records if r["phase"] == "final" and r["loss"] == loss and r["lr"] == key),
                  key=lambda r: r["seed"])


def values(rows: list[dict], model: str, column: str) -> list[float]:
    return [r["test"][model][column] for r in rows]


def paired(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b)]


def verdict(differences: list[float]) -> str:
    """holds when every seed's paired difference is > 0 and their mean exceeds their std (ours)."""
    mean, spread = statistics.mean(differences), statistics.stdev(differences)
    if all(d > 0 for d in differences) and mean > spread:
        return "holds"
    return "does not hold" + (" (same direction on average, not on every seed or within the spread)"
                              if mean > 0 else "")


def gain_text(differences: list[float]) -> str:
    return f"{harness.mean_std(differences)} pts (seeds: {', '.join(f'{100 * d:+.1f}' for d in differences)})"


def most_on_tail(gains: dict[str, list[float]]) -> str:
    """holds when the few-shot group has the largest mean gain of the three and that gain itself holds (`verdict`):
    a largest gain that is noise around zero is no gain on the tail."""
    largest = max(GROUPS, key=lambda g: statistics.mean(gains[g]))
    if largest != "few":
        return "does not hold"
    return "holds" if verdict(gains["few"]) == "holds" else "does not hold (the few-shot gain is within the noise)"


def best_single(rows: list[dict]) -> str:
    return max(BACKBONES, key=lambda b: statistics.mean(values(rows, b, "overall")))


def claims(by_loss: dict[str, list[dict]]) -> list[str]:
    lines = ["Claims (paired by seed; holds = every seed's difference > 0 and the mean above the std of the "
             "differences):"]
    for loss, rows in by_loss.items():
        best = best_single(rows)
        gains = {c: paired(values(rows, ENSEMBLE, c), values(rows, best, c)) for c in COLUMNS}
        most = max(GROUPS, key=lambda g: statistics.mean(gains[g]))
        lines.append(f"- `{loss}` ensemble beats the best single backbone ({best}) overall: "
                     f"**{verdict(gains['overall'])}**, {gain_text(gains['overall'])}; gains many / medium / few "
                     f"{' / '.join(harness.mean_std(gains[g]) for g in GROUPS)}: largest on **{most}** "
                     f"(\"most on tail classes\" **{most_on_tail(gains)}**)")
    for model in (*BACKBONES, ENSEMBLE):
        lift = paired(values(by_loss["la"], model, "few"), values(by_loss["ce"], model, "few"))
        lines.append(f"- LA lifts few-shot accuracy over plain fine-tuning ({model}): **{verdict(lift)}**, "
                     f"{gain_text(lift)}")
    return lines


def groups_figure(by_loss: dict[str, list[dict]], title: str):
    plt = harness.pyplot()
    arms = [(model, loss) for model in (*BACKBONES, ENSEMBLE) for loss in LOSSES]
    figure, axis = plt.subplots(figsize=(9, 4.4))
    width = 0.8 / len(arms)
    for index, (model, loss) in enumerate(arms):
        rows = by_loss[loss]
        means = [100 * statistics.mean(values(rows, model, c)) for c in COLUMNS]
        stds = [100 * statistics.stdev(values(rows, model, c)) for c in COLUMNS]
        axis.bar([g + (index - (len(arms) - 1) / 2) * width for g in range(len(COLUMNS))], means, width,
                 yerr=stds, capsize=2, label=f"{model} {loss}", hatch="//" if loss == "la" else None,
                 color=f"C{index // 2}", edgecolor="black", linewidth=0.5)
    axis.set_xticks(range(len(COLUMNS)), [c if c == "overall" else f"{c}-shot" for c in COLUMNS])
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.legend(ncol=6, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    axis.set_title(title)
    figure.tight_layout()
    return figure


def render(records: list[dict], settings: argparse.Namespace, env: dict, png: Path) -> tuple[str, object]:
    by_loss = {loss: finals(records, loss) for loss in LOSSES}
    counts = by_loss["ce"][0]["train_counts"]
    groups = shot_groups(counts)
    lines = [f"# Long-tail backdoor adjustment ({settings.task}, ρ = {settings.ratio:g}, GlyphViT + GlyphCNN)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"Training split per seed: {sum(counts):,} images, {counts[0]} … {counts[-1]} per class (realised "
             f"ratio {counts[0] / counts[-1]:.0f}); {groups.count('many')} many-shot (> 100), "
             f"{groups.count('medium')} medium (20-100), {groups.count('few')} few-shot (< 20) classes. Balanced "
             f"test split ({settings.task}: 50 per class). LoRA rank {settings.rank} + head, {settings.epochs} "
             f"epochs, batch 32, AdamW, linear decay; lr grid {settings.lrs} tuned per backbone and loss on seed "
             f"{settings.seeds[0]}'s validation accuracy; seeds {settings.seeds}. `la` = CE(z + log π) (τ = 1); "
             "ensemble = sum of the two backbones' logits (`logit_ensemble`, uniform P(z)). Test accuracy, %, "
             "mean ± std over seeds; groups are the mean per-class accuracy of their classes.", "",
             "| model | loss | chosen lr | overall | many | medium | few |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model in (*BACKBONES, ENSEMBLE):
        for loss in LOSSES:
            rows = by_loss[loss]
            rate = "-" if model == ENSEMBLE else f"{rows[0]['rates'][model]:g}"
            if model != ENSEMBLE and rows[0]["rates"][model] in (min(settings.lrs), max(settings.lrs)):
                rate += " (grid edge)"
            cells = " | ".join(harness.mean_std(values(rows, model, c)) for c in COLUMNS)
            lines.append(f"| {model} | {loss} | {rate} | {cells} |")
    spreads = " ; ".join(f"{loss}: " + ", ".join(
        f"{b} {statistics.mean(r['logit_std'][b] for r in rows):.2f}" for b in BACKBONES)
        for loss, rows in by_loss.items())
    lines += ["", f"Mean per-example std of the test logits over the classes (the weight of each backbone's vote "
              f"in the sum): {spreads}.", ""]
    lines += [*claims(by_loss), "", f"Plot: `{png.name}`.", "", "## Rate tuning (seed "
              f"{settings.seeds[0]}, validation accuracy %, seconds of training)", "",
              "| backbone | loss | lr | validation | few (validation) | s |", "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted((r for r in records if r["phase"] == "tune"), key=lambda r: (r["backbone"], r["loss"], r["lr"])):
        lines.append(f"| {r['backbone']} | {r['loss']} | {r['lr']:g} | {100 * r['validation']['overall']:.1f} | "
                     f"{100 * r['validation']['few']:.1f} | {r['seconds']:.0f} |")
    lines += ["", "## Every final run (test accuracy %: overall / few)", "",
              "| loss | seed | vit | cnn | ensemble | s (vit, cnn) |", "| --- | --- | --- | --- | --- | --- |"]
    for loss, rows in by_loss.items():
        for r in rows:
            cells = " | ".join(f"{100 * r['test'][m]['overall']:.1f} / {100 * r['test'][m]['few']:.1f}"
                               for m in (*BACKBONES, ENSEMBLE))
            lines.append(f"| {loss} | {r['seed']} | {cells} | {r['seconds']['vit']:.0f}, {r['seconds']['cnn']:.0f} |")
    title = (f"{settings.task}, long-tailed (ρ = {settings.ratio:g}), {len(settings.seeds)} seeds: "
             "mean ± std of test accuracy")
    return "\n".join(lines) + "\n", groups_figure(by_loss, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/longtail")
    parser.add_argument("--task", default="glyphs-novel")
    parser.add_argument("--ratio", type=float, default=50.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    settings = parser.parse_args(argv)
    torch.set_num_threads(settings.threads)
    env = harness.environment(threads=settings.threads)
    log = harness.RunLog(f"{settings.out}.jsonl", ("phase", "backbone", "loss", "lr", "seed"))
    tuning = harness.job_grid(phase=["tune"], backbone=BACKBONES, loss=LOSSES, lr=settings.lrs,
                              seed=settings.seeds[:1])
    harness.run_jobs(tuning, log, lambda job: tune(job, settings), describe=str)
    for loss in LOSSES:
        rates = chosen_rates(log.records(), loss)
        jobs = harness.job_grid(phase=["final"], backbone=["both"], loss=[loss], lr=[rate_key(rates)],
                                seed=settings.seeds)
        harness.run_jobs(jobs, log, lambda job, rates=rates: final(job, settings, rates), describe=str)
    png = Path(f"{settings.out}_groups.png")
    markdown, figure = render(log.records(), settings, env, png)
    harness.write_report(f"{settings.out}.md", markdown, {png: figure})
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

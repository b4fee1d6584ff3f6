"""PS-KD vs plain cross-entropy: accuracy and calibration of a fully fine-tuned GlyphCNN, few-shot handwritten digits.

    flock /work/wt/heavy.lock python benchmarks/pskd.py [--out benchmarks/results/pskd]

Protocol: task `handwritten-cnn` (the pretrained GlyphCNN, every parameter trained), `--train-size` images drawn
per seed (label-stratified, `load_task(seed=seed)`), the fixed validation (179) and test (359) splits; AdamW,
batch 32, linear decay, `--epochs` epochs; arms `plain` (cross-entropy) and `pskd` (α_T = 0.8, the paper's).
The learning rate is tuned per arm on the mean validation accuracy over the seeds, with the same grid for both;
the table reports the test numbers at each arm's chosen rate: accuracy, ECE (15 bins) and NLL, mean ± std over
seeds, and a reliability plot of the test predictions pooled over the seeds. Runs are logged in <out>.jsonl
(resumable); <out>.md and <out>_reliability.png are written from it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from deltatune.bench import harness
from deltatune.data import load_task
from deltatune.train import ProgressiveSelfKnowledgeDistillation, TrainConfig, Trainer, with_sample_index
from deltatune.train.calibration import reliability_bins

ARMS = ("plain", "pskd")
BINS = 15


@torch.no_grad()
def probabilities(model: torch.nn.Module, dataset, collate) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of `model` over `dataset` (eval mode) and the labels."""
    model.eval()
    batch = collate([dataset[i] for i in range(len(dataset))])
    logits = model(pixels=batch["pixels"].to(next(model.parameters()).device))
    return F.softmax(logits.float(), dim=1).cpu(), batch["labels"]


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    bins = reliability_bins(probs, labels, BINS)
    return {"accuracy": float((probs.argmax(1) == labels).double().mean()), "ece": bins.ece,
            "nll": float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)),
            "bins": {"count": bins.count.tolist(), "confidence": bins.confidence.tolist(),
                     "accuracy": bins.accuracy.tolist()}}


def run(job: dict, settings: argparse.Namespace) -> dict:
    task = load_task(settings.task, train_size=settings.train_size, seed=job["seed"])
    torch.manual_seed(job["seed"])
    model = task.build_model()
    config = TrainConfig(epochs=settings.epochs, batch_size=32, lr=job["lr"], seed=job["seed"], progress=False,
                         eval_every_epoch=False)
    if job["arm"] == "pskd":
        pskd = ProgressiveSelfKnowledgeDistillation(len(task.train), alpha_T=settings.alpha_T)
        Trainer(model, config, with_sample_index(task.train), loss_fn=pskd, callbacks=[pskd],
                collate_fn=task.collate).train()
    else:
        Trainer(model, config, task.train, collate_fn=task.collate).train()
    validation = scores(*probabilities(model, task.validation, task.collate))
    test = scores(*probabilities(model, task.test, task.collate))
    return {**job, "validation": {k: v for k, v in validation.items() if k != "bins"}, "test": test}


def chosen_lr(records: list[dict], arm: str) -> float:
    """The rate of the grid with the best mean validation accuracy for `arm` (ties: the smaller rate)."""
    by_lr: dict[float, list[float]] = {}
    for record in records:
        if record["arm"] == arm:
            by_lr.setdefault(record["lr"], []).append(record["validation"]["accuracy"])
    return max(sorted(by_lr), key=lambda lr: statistics.mean(by_lr[lr]))


def pooled_bins(rows: list[dict]) -> dict:
    count = torch.tensor([r["test"]["bins"]["count"] for r in rows]).sum(0)
    weighted = {key: (torch.tensor([r["test"]["bins"][key] for r in rows])
                      * torch.tensor([r["test"]["bins"]["count"] for r in rows])).sum(0) / count.clamp(min=1)
                for key in ("confidence", "accuracy")}
    return {"count": count, **weighted}


def reliability_figure(chosen: dict[str, list[dict]]):
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 4), sharey=True)
    for axis, (arm, rows) in zip(axes, chosen.items()):
        bins = pooled_bins(rows)
        centres = (torch.arange(BINS) + 0.5) / BINS
        filled = bins["count"] > 0
        axis.bar(centres[filled], bins["accuracy"][filled], width=1 / BINS, edgecolor="black", label="accuracy")
        axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        axis.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color="tab:red",
                  label="(mean confidence, accuracy)")
        ece = statistics.mean(r["test"]["ece"] for r in rows)
        axis.set_title(f"{arm} (lr {rows[0]['lr']:g}), test ECE {100 * ece:.2f}%")
        axis.set_xlabel("confidence")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def verdict(plain: list[float], pskd: list[float], lower_is_better: bool) -> str:
    """holds when PS-KD's mean beats plain's by more than the larger of the two seed stds."""
    gain = (statistics.mean(plain) - statistics.mean(pskd)) if lower_is_better else \
        (statistics.mean(pskd) - statistics.mean(plain))
    noise = max(statistics.stdev(plain), statistics.stdev(pskd))
    if gain > noise:
        return "holds"
    return "does not hold" + (" (same direction, within the seed spread)" if gain > 0 else "")


def render(records: list[dict], settings: argparse.Namespace, env: dict, png: Path) -> tuple[str, object]:
    chosen = {arm: sorted((r for r in records if r["arm"] == arm and r["lr"] == chosen_lr(records, arm)),
                          key=lambda r: r["seed"]) for arm in ARMS}
    lines = [f"# PS-KD vs plain training ({settings.task}, full fine-tune)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"{settings.train_size} training images per seed, {settings.epochs} epochs, batch 32, AdamW, linear "
             f"decay; α_T = {settings.alpha_T}; lr grid {settings.lrs} tuned per arm on mean validation accuracy; "
             f"seeds {settings.seeds}. Test: {BINS}-bin ECE, NLL, accuracy (mean ± std, %; NLL in nats).", "",
             "| arm | chosen lr | validation acc | test acc | test ECE | test NLL |",
             "| --- | --- | --- | --- | --- | --- |"]
    for arm, rows in chosen.items():
        lines.append(f"| {arm} | {rows[0]['lr']:g} | {harness.mean_std([r['validation']['accuracy'] for r in rows])} "
                     f"| {harness.mean_std([r['test']['accuracy'] for r in rows])} | "
                     f"{harness.mean_std([r['test']['ece'] for r in rows], digits=2)} | "
                     f"{harness.mean_std([r['test']['nll'] for r in rows], scale=1, digits=3)} |")
    get = {key: {arm: [r["test"][key] for r in rows] for arm, rows in chosen.items()} for key in ("accuracy", "ece")}
    lines += ["", "Claims (holds = PS-KD better by more than the larger seed std):",
              f"- PS-KD lowers the error: {verdict(get['accuracy']['plain'], get['accuracy']['pskd'], False)}",
              f"- PS-KD lowers the ECE: {verdict(get['ece']['plain'], get['ece']['pskd'], True)}", "",
              f"Reliability plot: `{png.name}`.", "", "## Every run (validation / test accuracy, test ECE)", "",
              "| arm | lr | seed | validation | test | ECE |", "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (r["arm"], r["lr"], r["seed"])):
        lines.append(f"| {r['arm']} | {r['lr']:g} | {r['seed']} | {100 * r['validation']['accuracy']:.1f} | "
                     f"{100 * r['test']['accuracy']:.1f} | {100 * r['test']['ece']:.2f} |")
    return "\n".join(lines) + "\n", reliability_figure(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/pskd")
    parser.add_argument("--task", default="handwritten-cnn")
    parser.add_argument("--train-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--alpha-T", dest="alpha_T", type=float, default=0.8)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    settings = parser.parse_args(argv)
    torch.set_num_threads(settings.threads)
    env = harness.environment(threads=settings.threads)
    log = harness.RunLog(f"{settings.out}.jsonl", ("arm", "lr", "seed"))
    jobs = harness.job_grid(arm=ARMS, lr=settings.lrs, seed=settings.seeds)
    harness.run_jobs(jobs, log, lambda job: run(job, settings), describe=str)
    png = Path(f"{settings.out}_reliability.png")
    markdown, figure = render(log.records(), settings, env, png)
    harness.write_report(f"{settings.out}.md", markdown, {png: figure})
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

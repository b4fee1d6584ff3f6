"""The three-regime pruning study on a small BatchNorm CNN: SAM's ρ (temperature) × density (load).

    nohup /work/wt/slot env PYTHONPATH=src python benchmarks/three_regime.py [--out benchmarks/results/three_regime]

Protocol (the official code's pipeline, other.md §11, scaled to this CPU): the `digits` task (scikit-learn's 8x8
digits, fixed 1,259 / 179 / 359 split); the shipped GlyphCNN architecture trained **from scratch** (random init,
channels `--channels`, 2x2 pools after blocks 0 and 2, so 8x8 → 2x2; BatchNorm after every conv). Dense training:
SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 64, `--epochs` epochs, ×0.1 at 1/2 and 3/4 of them (the code's
160 epochs with steps at 80 / 120, shortened), optimizer SGD (ρ = 0) or SAM with base SGD at each ρ of `--rhos`
(BatchNorm statistics from SAM's first pass only, as the code). Prune: unstructured L1 magnitude on every conv
weight, uniform per layer (the code's `unif`), at each density of `--densities`. Retrain from the pruned weights
with plain SGD (same recipe and length; masks kept), once per retrain seed (the seed sets the data order).
Measure per cell: test error of each retrained model; LMC barrier between the two retrained models on the training
error over 11 points (BatchNorm re-estimated on the training set at each point, as the code); linear CKA of their
softmax outputs on the training images. Everything is repeated for each dense seed of `--seeds` and averaged.
Regimes and advice: `deltatune.train.prunability.label_regimes` with thresholds calibrated on the grid.
Runs are logged in <out>.jsonl (one record per ρ and dense seed, resumable); <out>.md and <out>.png come from it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.bench import harness
from deltatune.data import load_task
from deltatune.data.vision import GlyphCNN
from deltatune.optim import SAM
from deltatune.train.landscape import batch_norms
from deltatune.train.prunability import SweepCell, label_regimes, measure_density
from deltatune.train.pruning import PrunedWeights

EVAL_BATCH = 256


class DigitsSweep:
    """A `PrunabilityTask` on the digits task: plain-loop SGD / SAM training on in-memory tensors."""

    def __init__(self, settings: argparse.Namespace) -> None:
        task = load_task("digits")
        self.train_x, self.train_y = task.train.tensors["pixels"], task.train.labels
        self.test_x, self.test_y = task.test.tensors["pixels"], task.test.labels
        self.settings = settings
        # the code's BatchNorm loader: the training set in order, unshuffled
        self.norm_inputs = list(self.train_x.split(settings.batch_size))

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return GlyphCNN(num_classes=10, channels=tuple(self.settings.channels), pool_after=(0, 2))

    def dense_train(self, model: nn.Module, temperature: float, seed: int) -> None:
        self._train(model, rho=temperature, seed=seed)

    def retrain(self, model: nn.Module, pruned: PrunedWeights, seed: int) -> None:
        self._train(model, rho=0.0, seed=1000 + seed, pruned=pruned)

    def _train(self, model: nn.Module, *, rho: float, seed: int, pruned: PrunedWeights | None = None) -> None:
        settings = self.settings
        sgd = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
        optimizer = SAM(sgd, rho=rho, model=model) if rho > 0 else sgd
        milestones = [settings.epochs // 2, (3 * settings.epochs) // 4]
        schedule = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=milestones, gamma=0.1)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(settings.epochs):
            order = torch.randperm(len(self.train_y), generator=generator)
            for batch in order.split(settings.batch_size):
                x, y = self.train_x[batch], self.train_y[batch]

                def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                closure()
                optimizer.step(closure) if rho > 0 else optimizer.step()
                if pruned is not None:
                    pruned.apply()
            schedule.step()

    @torch.no_grad()
    def _error(self, model: nn.Module, x: Tensor, y: Tensor) -> float:
        model.eval()
        wrong = sum(int((model(xb).argmax(1) != yb).sum()) for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)))
        return wrong / len(y)

    def train_error(self, model: nn.Module) -> float:
        return self._error(model, self.train_x, self.train_y)

    def test_error(self, model: nn.Module) -> float:
        return self._error(model, self.test_x, self.test_y)

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> Tensor:
        model.eval()
        return torch.cat([model(xb).softmax(1) for xb in self.train_x.split(EVAL_BATCH)])


def complete_seeds(records: list[dict], settings: argparse.Namespace) -> list[dict]:
    """The records of the dense seeds asked for whose every ρ has finished (a stopped run still gives a grid)."""
    wanted = [r for r in records if r["rho"] in settings.rhos and r["seed"] in settings.seeds]
    done = {seed for seed in settings.seeds if {r["rho"] for r in wanted if r["seed"] == seed} >= set(settings.rhos)}
    return [r for r in wanted if r["seed"] in done]


def run(job: dict, task: DigitsSweep, settings: argparse.Namespace) -> dict:
    start = time.perf_counter()
    dense = task.build_model(job["seed"])
    task.dense_train(dense, job["rho"], job["seed"])
    dense_error = task.test_error(dense)
    cells = []
    for density in settings.densities:
        cell = measure_density(task, dense, job["rho"], density, retrain_seeds=(0, 1), dense_test_error=dense_error)
        cells.append({"density": density, "test_errors": cell.test_errors, "barrier": cell.barrier,
                      "cka": cell.cka, "curve": cell.curves[0], "kept": cell.kept})
        print(f"  rho {job['rho']} seed {job['seed']} density {density}: test {cell.test_errors}, "
              f"barrier {cell.barrier:+.4f}, cka {cell.cka:.4f}", flush=True)
    return {**job, "dense_test_error": dense_error, "cells": cells, "seconds": time.perf_counter() - start,
            "norms": len(batch_norms(dense))}


def pooled_cells(records: list[dict], densities: list[float]) -> list[SweepCell]:
    """One SweepCell per (ρ, density of `densities`): test errors of every retrained model, barriers and CKAs of
    every pair, over the dense seeds."""
    grouped: dict[tuple[float, float], list[tuple[dict, dict]]] = {}
    for record in records:
        for cell in record["cells"]:
            if cell["density"] not in densities:
                continue
            grouped.setdefault((record["rho"], cell["density"]), []).append((record, cell))
    pooled = []
    for (rho, density), items in sorted(grouped.items()):
        pooled.append(SweepCell(rho, density, tuple(e for _, c in items for e in c["test_errors"]),
                                tuple(c["barrier"] for _, c in items), tuple(c["cka"] for _, c in items),
                                tuple(tuple(c["curve"]) for _, c in items), items[0][1]["kept"],
                                statistics.mean(r["dense_test_error"] for r, _ in items)))
    return pooled


def temperature_effect(cells: list[SweepCell], density: float, rhos: list[float]) -> tuple[float, float, float]:
    """(mean test error of the hotter half of ρ − that of the colder half, its standard error, the same
    difference of medians) at one density."""
    by_rho = {c.temperature: c for c in cells if c.density == density}
    half = len(rhos) // 2
    cold = [e for rho in rhos[:half] for e in by_rho[rho].test_errors]
    hot = [e for rho in rhos[-half:] for e in by_rho[rho].test_errors]
    spread = (statistics.variance(cold) / len(cold) + statistics.variance(hot) / len(hot)) ** 0.5
    return statistics.mean(hot) - statistics.mean(cold), spread, statistics.median(hot) - statistics.median(cold)


def standard_error_of_difference(a: SweepCell, b: SweepCell) -> float:
    return (statistics.variance(a.test_errors) / len(a.test_errors)
            + statistics.variance(b.test_errors) / len(b.test_errors)) ** 0.5


def sign_flips(signs: list[str]) -> bool:
    """Both significant signs occur, and every significant one on one side of the density axis is the same."""
    significant = [sign for sign in signs if sign != "within 2 SE"]
    changes = sum(a != b for a, b in zip(significant, significant[1:]))
    return changes == 1


def advice_outcomes(cells: list[SweepCell], regimes, rhos: list[float]) -> list[dict]:
    """For every cell whose advice is to move and that has a neighbour that way: did the move lower the error?"""
    by_key = {(c.temperature, c.density): c for c in cells}
    outcomes = []
    for cell in cells:
        advice = regimes.advice(cell.temperature, cell.density)
        index = rhos.index(cell.temperature)
        step = {"raise": 1, "lower": -1}.get(advice)
        if step is None or not 0 <= index + step < len(rhos):
            continue
        moved = by_key[(rhos[index + step], cell.density)]
        change, noise = moved.test_error - cell.test_error, 2 * standard_error_of_difference(cell, moved)
        outcomes.append({"rho": cell.temperature, "density": cell.density, "advice": advice,
                         "to": moved.temperature, "before": cell.test_error, "after": moved.test_error,
                         "noise": noise, "verdict": "better" if change < -noise else "worse" if change > noise
                         else "within 2 SE"})
    return outcomes


def render(records: list[dict], settings: argparse.Namespace, env: dict) -> str:
    cells = pooled_cells(records, settings.densities)
    rhos, densities = sorted({c.temperature for c in cells}), sorted({c.density for c in cells}, reverse=True)
    regimes = label_regimes(cells)
    by_key = {(c.temperature, c.density): c for c in cells}
    seconds = sum(r["seconds"] for r in records)
    lines = [f"# Three-regime pruning: SAM ρ × density ({settings.task}, GlyphCNN architecture from scratch)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"Protocol: {__doc__.split('Protocol')[1].split('Runs are logged')[0].strip()}", "",
             f"This run: ρ ∈ {rhos} (0 = plain SGD), densities {densities}, {settings.epochs} epochs dense and "
             f"{settings.epochs} retrain, channels {settings.channels}, dense seeds "
             f"{sorted({r['seed'] for r in records})}, retrain seeds (0, 1); {seconds / 60:.1f} min wall time in the "
             f"CPU slot (one thread, shared machine) in all. "
             f"Thresholds calibrated on the grid: hump "
             f"−barrier > {regimes.hump_threshold:.4f} ⇒ I; CKA threshold "
             f"{'none (II not split)' if regimes.cka_threshold is None else f'{regimes.cka_threshold:.4f}'}.", "",
             "## Test error after retraining (%), mean ± std over dense seeds × retrain seeds", "",
             "| ρ \\ density | " + " | ".join(f"{d:g}" for d in densities) + " | dense |",
             "| --- | " + " | ".join("---" for _ in densities) + " | --- |"]
    for rho in rhos:
        row = [harness.mean_std(list(by_key[(rho, d)].test_errors)) for d in densities]
        dense = by_key[(rho, densities[0])].dense_test_error
        lines.append(f"| {rho:g} | " + " | ".join(row) + f" | {100 * dense:.1f} |")
    collapsed = [(rho, d, e) for rho in rhos for d in densities for e in by_key[(rho, d)].test_errors
                 if e > 3 * statistics.median(by_key[(rho, d)].test_errors) and e > 0.2]
    lines += ["", f"Retrained models that collapsed (test error > 20% and > 3x their cell's median): {len(collapsed)}"
              + "".join(f"; ρ {rho:g}, density {d:g}: {100 * e:.1f}%" for rho, d, e in collapsed) + "."]
    lines += ["", "## Barrier (train error, ×100; negative = hump) / CKA of softmax outputs / regime → advice", "",
              "| ρ \\ density | " + " | ".join(f"{d:g}" for d in densities) + " |",
              "| --- | " + " | ".join("---" for _ in densities) + " |"]
    for rho in rhos:
        row = []
        for d in densities:
            cell = by_key[(rho, d)]
            regime = regimes.regimes[(rho, d)]
            row.append(f"{100 * cell.barrier:+.2f} / {cell.cka:.4f} / {regime} → {regimes.advice(rho, d)}")
        lines.append(f"| {rho:g} | " + " | ".join(row) + " |")
    lines += ["", "## Effect of temperature at each density", "",
              "Hotter half of the ρ grid minus colder half, test error (points), ± its standard error over runs.", "",
              "| density | kept conv weights | hot − cold, means (points) | sign | hot − cold, medians |",
              "| --- | --- | --- | --- | --- |"]
    signs = []
    for d in densities:
        effect, spread, median_effect = temperature_effect(cells, d, rhos)
        sign = "hotter better" if effect < -2 * spread else "hotter worse" if effect > 2 * spread else "within 2 SE"
        signs.append(sign)
        lines.append(f"| {d:g} | {by_key[(rhos[0], d)].kept} | {100 * effect:+.2f} ± {100 * spread:.2f} | {sign} | "
                     f"{100 * median_effect:+.2f} |")
    lines += ["", f"Sign flip across a load threshold (both signs beyond 2 SE, not interleaved in density): "
              f"**{'holds' if sign_flips(signs) else 'does not hold'}** ({', '.join(signs)}, densities "
              f"{', '.join(f'{d:g}' for d in densities)})."]
    outcomes = advice_outcomes(cells, regimes, rhos)
    lines += ["", "## Does the advice point the right way?", "",
              "| ρ | density | regime advice | moved to ρ | error before → after (%) | 2 SE of the change | outcome |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        lines.append(f"| {o['rho']:g} | {o['density']:g} | {o['advice']} | {o['to']:g} | "
                     f"{100 * o['before']:.2f} → {100 * o['after']:.2f} | {100 * o['noise']:.2f} | {o['verdict']} |")
    better = sum(o["verdict"] == "better" for o in outcomes)
    worse = sum(o["verdict"] == "worse" for o in outcomes)
    verdict = "holds" if len(outcomes) >= 3 and better >= 0.75 * len(outcomes) else "does not hold"
    lines += ["", f"Advice followed: {better} of {len(outcomes)} moves lower the error by more than 2 SE, {worse} "
              f"raise it by more (ours: the regime 'predicts which way to move' if at least 3 moves are advised and "
              f"3 in 4 of them help beyond 2 SE): **{verdict}**.", ""]
    return "\n".join(lines) + "\n"


def phase_plot(records: list[dict], settings: argparse.Namespace):
    cells = pooled_cells(records, settings.densities)
    regimes = label_regimes(cells)
    rhos, densities = sorted({c.temperature for c in cells}), sorted({c.density for c in cells}, reverse=True)
    by_key = {(c.temperature, c.density): c for c in cells}
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [("LMC barrier (train error, negative = hump)", lambda c: c.barrier, "Blues_r"),
              ("CKA of softmax outputs", lambda c: c.cka, "Blues"),
              ("test error after retraining", lambda c: c.test_error, "Reds")]
    for axis, (title, value, cmap) in zip(axes, panels):
        grid = [[value(by_key[(rho, d)]) for d in densities] for rho in rhos]
        image = axis.pcolormesh(torch.tensor(grid).numpy(), cmap=cmap)
        figure.colorbar(image, ax=axis)
        for i, rho in enumerate(rhos):
            for j, d in enumerate(densities):
                cell = by_key[(rho, d)]
                shade = float(image.norm(value(cell)))
                dark = (1 - shade if cmap.endswith("_r") else shade) > 0.6  # white text on the dark end
                axis.text(j + 0.5, i + 0.5, f"{regimes.regimes[(rho, d)]}\n{100 * cell.test_error:.1f}%",
                          ha="center", va="center", fontsize=8, color="white" if dark else "black")
        axis.set_xticks([j + 0.5 for j in range(len(densities))], [f"{d:g}" for d in densities])
        axis.set_yticks([i + 0.5 for i in range(len(rhos))], [f"{r:g}" for r in rhos])
        axis.set_xlabel("load: density kept")
        axis.set_ylabel("temperature: SAM ρ")
        axis.set_title(title, fontsize=10)
    figure.suptitle("Three-regime phase plot (cell text: regime, post-retrain test error)")
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/three_regime")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.03, 0.02])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--channels", type=int, nargs=4, default=[16, 32, 32, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="write the report from the log, run nothing")
    settings = parser.parse_args(argv)
    torch.set_num_threads(settings.threads)
    # a report re-rendered from the log names the command that made the runs
    argv = [arg for arg in sys.argv if arg != "--render-only"] if argv is None else ["three_regime.py", *argv]
    env = harness.environment(threads=settings.threads, command=harness.command_line(argv))
    task = DigitsSweep(settings)
    log = harness.RunLog(f"{settings.out}.jsonl", ("rho", "seed"))
    jobs = harness.job_grid(seed=settings.seeds, rho=settings.rhos)  # every ρ of a seed first: a partial log is a grid
    if not settings.render_only:
        harness.run_jobs(jobs, log, lambda job: run(job, task, settings), describe=str)
    records = complete_seeds(log.records(), settings)
    harness.write_report(f"{settings.out}.md", render(records, settings, env),
                         {f"{settings.out}.png": phase_plot(records, settings)})
    print(render(records, settings, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())

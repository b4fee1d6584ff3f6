"""The three-regime pruning study on a small BatchNorm CNN: a temperature knob (SAM's ρ or the number of dense
epochs) × density (load).

    nohup /work/wt/slot env PYTHONPATH=src python benchmarks/three_regime.py [--out benchmarks/results/three_regime]
    nohup /work/wt/slot env PYTHONPATH=src python benchmarks/three_regime.py --knob epochs --dense-epochs 5 10 20 40 \
        --retrain-lr 0.02 --warmup 2 --out benchmarks/results/three_regime_epochs

Protocol (the official code's pipeline, other.md §11, scaled to this CPU): the `digits` task (scikit-learn's 8x8
digits, fixed 1,259 / 179 / 359 split); the shipped GlyphCNN architecture trained **from scratch** (random init,
channels `--channels`, 2x2 pools after blocks 0 and 2, so 8x8 → 2x2; BatchNorm after every conv). Dense training:
SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 64, `--epochs` epochs, ×0.1 at 1/2 and 3/4 of them (the code's
160 epochs with steps at 80 / 120, shortened), optimizer SGD (ρ = 0) or SAM with base SGD at each ρ of `--rhos`
(BatchNorm statistics from SAM's first pass only, as the code). With `--knob epochs` the temperature is the
length of dense training instead (plain SGD): one dense run per seed of max(`--dense-epochs`) epochs with its
steps at 1/2 and 3/4 of that length, checkpointed at each count of `--dense-epochs` (the code trains 160 epochs
and prunes its checkpoints every 10), so all epoch counts cost one run; fewer epochs = hotter (the VSDL
convention, inferred in other.md §11). Prune: unstructured L1 magnitude on every conv weight, uniform per layer
(the code's `unif`), at each density of `--densities`. Retrain from the pruned weights with plain SGD (same
recipe; masks kept) at `--retrain-lr` for `--retrain-epochs` (both default to the dense run's), after a linear
warm-up over the first `--warmup` epochs (ours; 0 = none, as the code), once per retrain seed (the seed sets the
data order).
Measure per cell: test error of each retrained model; LMC barrier between the two retrained models on the training
error over 11 points (BatchNorm re-estimated on the training set at each point, as the code); linear CKA of their
softmax outputs on the training images. Everything is repeated for each dense seed of `--seeds` and averaged.
Regimes and advice: `deltatune.train.prunability.label_regimes` with thresholds calibrated on the grid.
Runs are logged in <out>.jsonl (one record per knob value and dense seed, resumable); <out>.md and <out>.png come
from it.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.bench import harness
from deltatune.data import load_task
from deltatune.data.vision import GlyphCNN
from deltatune.errors import ConfigError
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
        settings = self.settings
        self._train(model, rho=temperature, seed=seed, lr=settings.lr, epochs=settings.epochs, warmup=0)

    def dense_checkpoints(self, model: nn.Module, seed: int) -> dict[int, dict[str, Tensor]]:
        """Train `model` once with plain SGD for max(--dense-epochs) epochs; its state after each count of
        --dense-epochs (the temperature of the epochs knob)."""
        settings = self.settings
        wanted, states = set(settings.dense_epochs), {}

        def keep(epoch: int) -> None:
            if epoch in wanted:
                states[epoch] = copy.deepcopy(model.state_dict())

        self._train(model, rho=0.0, seed=seed, lr=settings.lr, epochs=max(wanted), warmup=0, after_epoch=keep)
        return states

    def retrain(self, model: nn.Module, pruned: PrunedWeights, seed: int) -> None:
        settings = self.settings
        self._train(model, rho=0.0, seed=1000 + seed, pruned=pruned, lr=settings.retrain_lr,
                    epochs=settings.retrain_epochs, warmup=settings.warmup)

    def _train(self, model: nn.Module, *, rho: float, seed: int, lr: float, epochs: int, warmup: int,
               pruned: PrunedWeights | None = None, after_epoch: Callable[[int], None] | None = None) -> None:
        settings = self.settings
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=settings.weight_decay)
        optimizer = SAM(sgd, rho=rho, model=model) if rho > 0 else sgd
        milestones = [epochs // 2, (3 * epochs) // 4]
        schedule = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=milestones, gamma=0.1)
        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = -(-len(self.train_y) // settings.batch_size)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(self.train_y), generator=generator)
            scheduled = [group["lr"] for group in sgd.param_groups]
            for step, batch in enumerate(order.split(settings.batch_size)):
                if epoch < warmup:  # ours: linear warm-up per step, so a sparse net does not take lr's full step
                    scale = (epoch * steps_per_epoch + step + 1) / (warmup * steps_per_epoch)
                    for group, base in zip(sgd.param_groups, scheduled):
                        group["lr"] = base * scale
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
            for group, base in zip(sgd.param_groups, scheduled):
                group["lr"] = base  # the step schedule continues from the un-warmed rate
            schedule.step()
            if after_epoch is not None:
                after_epoch(epoch + 1)
            model.train()

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


KNOB_LABELS = {"rho": "SAM ρ", "epochs": "dense epochs"}


def temperatures(settings: argparse.Namespace) -> list[float]:
    """The knob's values from coldest to hottest: ρ ascending; epochs descending (longer training = colder)."""
    if settings.knob == "rho":
        return sorted(settings.rhos)
    return sorted(settings.dense_epochs, reverse=True)


def complete_seeds(records: list[dict], settings: argparse.Namespace) -> list[dict]:
    """The records of the dense seeds asked for whose every knob value has finished (a stopped run still gives a
    grid)."""
    values = set(temperatures(settings))
    wanted = [r for r in records if r.get(settings.knob) in values and r["seed"] in settings.seeds]
    done = {seed for seed in settings.seeds if {r[settings.knob] for r in wanted if r["seed"] == seed} >= values}
    return [r for r in wanted if r["seed"] in done]


def measure(job: dict, task: DigitsSweep, dense: nn.Module, temperature: float, settings: argparse.Namespace,
            start: float) -> dict:
    dense_error = task.test_error(dense)
    cells = []
    for density in settings.densities:
        cell = measure_density(task, dense, temperature, density, retrain_seeds=(0, 1), dense_test_error=dense_error)
        cells.append({"density": density, "test_errors": cell.test_errors, "barrier": cell.barrier,
                      "cka": cell.cka, "curve": cell.curves[0], "kept": cell.kept})
        print(f"  {settings.knob} {temperature:g} seed {job['seed']} density {density}: test {cell.test_errors}, "
              f"barrier {cell.barrier:+.4f}, cka {cell.cka:.4f}", flush=True)
    return {**job, "dense_test_error": dense_error, "cells": cells, "seconds": time.perf_counter() - start,
            "norms": len(batch_norms(dense))}


def run(job: dict, task: DigitsSweep, settings: argparse.Namespace) -> dict:
    start = time.perf_counter()
    dense = task.build_model(job["seed"])
    task.dense_train(dense, job["rho"], job["seed"])
    return measure(job, task, dense, job["rho"], settings, start)


class EpochCheckpoints:
    """Runs the epochs knob's jobs: one dense run per seed gives every epoch count's checkpoint; the jobs of a
    seed come one after the other (the grid's order), so only the current seed's checkpoints are held."""

    def __init__(self, task: DigitsSweep, settings: argparse.Namespace) -> None:
        self.task, self.settings = task, settings
        self.seed: int | None = None
        self.states: dict[int, dict[str, Tensor]] = {}

    def __call__(self, job: dict) -> dict:
        start = time.perf_counter()  # the dense run's time is counted in the first job of its seed
        if job["seed"] != self.seed:
            self.states = self.task.dense_checkpoints(self.task.build_model(job["seed"]), job["seed"])
            self.seed = job["seed"]
        dense = self.task.build_model(job["seed"])
        dense.load_state_dict(self.states[job["epochs"]])
        return measure(job, self.task, dense, job["epochs"], self.settings, start)


def temperature_of(record: dict, knob: str) -> float:
    return float(record[knob])


def pooled_cells(records: list[dict], densities: list[float], knob: str = "rho") -> list[SweepCell]:
    """One SweepCell per (knob value, density of `densities`): test errors of every retrained model, barriers and
    CKAs of every pair, over the dense seeds."""
    grouped: dict[tuple[float, float], list[tuple[dict, dict]]] = {}
    for record in records:
        for cell in record["cells"]:
            if cell["density"] not in densities:
                continue
            grouped.setdefault((temperature_of(record, knob), cell["density"]), []).append((record, cell))
    pooled = []
    for (rho, density), items in sorted(grouped.items()):
        pooled.append(SweepCell(rho, density, tuple(e for _, c in items for e in c["test_errors"]),
                                tuple(c["barrier"] for _, c in items), tuple(c["cka"] for _, c in items),
                                tuple(tuple(c["curve"]) for _, c in items), items[0][1]["kept"],
                                statistics.mean(r["dense_test_error"] for r, _ in items)))
    return pooled


def temperature_effect(cells: list[SweepCell], density: float, rhos: list[float]) -> tuple[float, float, float]:
    """(mean test error of the hotter half of the knob (`rhos` ordered coldest first) − that of the colder half,
    its standard error, the same difference of medians) at one density."""
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
    cells = pooled_cells(records, settings.densities, settings.knob)
    rhos = [t for t in temperatures(settings) if any(c.temperature == t for c in cells)]  # coldest first
    densities = sorted({c.density for c in cells}, reverse=True)
    knob = KNOB_LABELS[settings.knob]
    retrain = (f"{settings.retrain_epochs} retrain at lr {settings.retrain_lr:g}"
               + (f" after a {settings.warmup}-epoch warm-up" if settings.warmup else ""))
    if settings.knob == "rho":
        this_run = (f"ρ ∈ {rhos} (0 = plain SGD), densities {densities}, {settings.epochs} epochs dense and "
                    f"{retrain}")
    else:
        this_run = (f"dense epochs {rhos} (checkpoints of one {max(rhos)}-epoch plain-SGD run per seed, coldest "
                    f"first), densities {densities}, {retrain}")
    regimes = label_regimes(cells)
    by_key = {(c.temperature, c.density): c for c in cells}
    seconds = sum(r["seconds"] for r in records)
    lines = [f"# Three-regime pruning: {knob} × density ({settings.task}, GlyphCNN architecture from scratch)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             f"Protocol: {__doc__.split('Protocol')[1].split('Runs are logged')[0].strip()}", "",
             f"This run: {this_run}, channels {settings.channels}, dense seeds "
             f"{sorted({r['seed'] for r in records})}, retrain seeds (0, 1); {seconds / 60:.1f} min wall time in the "
             f"CPU slot (one thread, shared machine) in all. "
             f"Thresholds calibrated on the grid: hump "
             f"−barrier > {regimes.hump_threshold:.4f} ⇒ I; CKA threshold "
             f"{'none (II not split)' if regimes.cka_threshold is None else f'{regimes.cka_threshold:.4f}'}.", "",
             "## Test error after retraining (%), mean ± std over dense seeds × retrain seeds", "",
             f"| {knob} \\ density | " + " | ".join(f"{d:g}" for d in densities) + " | dense |",
             "| --- | " + " | ".join("---" for _ in densities) + " | --- |"]
    for rho in rhos:
        row = [harness.mean_std(list(by_key[(rho, d)].test_errors)) for d in densities]
        dense = by_key[(rho, densities[0])].dense_test_error
        lines.append(f"| {rho:g} | " + " | ".join(row) + f" | {100 * dense:.1f} |")
    collapsed = [(rho, d, e) for rho in rhos for d in densities for e in by_key[(rho, d)].test_errors
                 if e > 3 * statistics.median(by_key[(rho, d)].test_errors) and e > 0.2]
    lines += ["", f"Retrained models that collapsed (test error > 20% and > 3x their cell's median): {len(collapsed)}"
              + "".join(f"; {knob} {rho:g}, density {d:g}: {100 * e:.1f}%" for rho, d, e in collapsed) + "."]
    lines += ["", "## Barrier (train error, ×100; negative = hump) / CKA of softmax outputs / regime → advice", "",
              f"| {knob} \\ density | " + " | ".join(f"{d:g}" for d in densities) + " |",
              "| --- | " + " | ".join("---" for _ in densities) + " |"]
    for rho in rhos:
        row = []
        for d in densities:
            cell = by_key[(rho, d)]
            regime = regimes.regimes[(rho, d)]
            row.append(f"{100 * cell.barrier:+.2f} / {cell.cka:.4f} / {regime} → {regimes.advice(rho, d)}")
        lines.append(f"| {rho:g} | " + " | ".join(row) + " |")
    lines += ["", "## Effect of temperature at each density", "",
              f"Hotter half of the {knob} grid minus colder half"
              + (" (fewer epochs = hotter)" if settings.knob == "epochs" else "")
              + ", test error (points), ± its standard error over runs.", "",
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
              f"| {knob} | density | regime advice | moved to {knob} | error before → after (%) | 2 SE of the change "
              "| outcome |",
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
    cells = pooled_cells(records, settings.densities, settings.knob)
    regimes = label_regimes(cells)
    rhos = [t for t in temperatures(settings) if any(c.temperature == t for c in cells)]  # coldest at the bottom
    densities = sorted({c.density for c in cells}, reverse=True)
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
        axis.set_ylabel(f"temperature: {KNOB_LABELS[settings.knob]}")
        axis.set_title(title, fontsize=10)
    figure.suptitle("Three-regime phase plot (cell text: regime, post-retrain test error)")
    figure.tight_layout()
    return figure


def check_settings(settings: argparse.Namespace) -> None:
    """Refuse settings the study cannot run, naming the fix."""
    if settings.knob == "epochs" and (len(set(settings.dense_epochs)) < 2 or min(settings.dense_epochs) < 1):
        raise ConfigError(f"--dense-epochs {settings.dense_epochs} is invalid: expected at least 2 distinct positive "
                          "epoch counts (the temperature grid of --knob epochs)")
    if not 0 <= settings.warmup <= settings.retrain_epochs:
        raise ConfigError(f"--warmup {settings.warmup} is invalid: expected 0 to --retrain-epochs "
                          f"({settings.retrain_epochs}) epochs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/three_regime")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--knob", choices=sorted(KNOB_LABELS), default="rho",
                        help="the temperature: SAM's ρ (one dense run per ρ) or the number of dense epochs "
                             "(checkpoints of one run)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--dense-epochs", type=int, nargs="+", default=[5, 10, 20, 40],
                        help="--knob epochs: the epoch counts whose dense checkpoints are pruned")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.03, 0.02])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--channels", type=int, nargs=4, default=[16, 32, 32, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--retrain-lr", type=float, default=None, help="retraining rate (default: --lr)")
    parser.add_argument("--retrain-epochs", type=int, default=None, help="retraining length (default: --epochs)")
    parser.add_argument("--warmup", type=int, default=0, help="retraining warm-up epochs (ours; 0 = none)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="write the report from the log, run nothing")
    settings = parser.parse_args(argv)
    settings.retrain_lr = settings.lr if settings.retrain_lr is None else settings.retrain_lr
    settings.retrain_epochs = settings.epochs if settings.retrain_epochs is None else settings.retrain_epochs
    check_settings(settings)
    torch.set_num_threads(settings.threads)
    # a report re-rendered from the log names the command that made the runs
    argv = [arg for arg in sys.argv if arg != "--render-only"] if argv is None else ["three_regime.py", *argv]
    env = harness.environment(threads=settings.threads, command=harness.command_line(argv))
    task = DigitsSweep(settings)
    log = harness.RunLog(f"{settings.out}.jsonl", (settings.knob, "seed"))
    # every knob value of a seed first: a partial log is a grid, and the epochs knob's checkpoints serve in turn
    jobs = harness.job_grid(seed=settings.seeds, **{settings.knob: temperatures(settings)})
    if not settings.render_only:
        if settings.knob == "epochs":
            harness.run_jobs(jobs, log, EpochCheckpoints(task, settings), describe=str)
        else:
            harness.run_jobs(jobs, log, lambda job: run(job, task, settings), describe=str)
    records = complete_seeds(log.records(), settings)
    harness.write_report(f"{settings.out}.md", render(records, settings, env),
                         {f"{settings.out}.png": phase_plot(records, settings)})
    print(render(records, settings, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""M2N2 vs CMA-ES: evolve small MLP digit classifiers from scratch at the same number of fitness evaluations.

The official M2N2 from-scratch experiment (SakanaAI/natural_niches: `main.py`, `cma_es_fn.py`, `data.py`,
`model.py`), scaled down to fit a shared 2-core CPU:
- data: scikit-learn `load_digits`, raw pixels 0..16, the official fixed split (first 80% = 1,437 train, last
  360 test); `--split stratified` uses a seeded, label-stratified 80/20 split instead;
- model: MLP 64 -> hidden (ReLU) -> 10 as one flat vector in the official layout (w1, b1, w2, b2); the paper
  uses hidden = 256 (19,210 parameters), we default to hidden = 32 (2,410) because full CMA-ES stores and
  eigendecomposes a D x D covariance (19,210^2 doubles = 2.9 GB, twice) — out of reach here;
- fitness = training accuracy; reported = test accuracy of the member with the best training accuracy (M2N2:
  archive member with the best raw training accuracy; CMA-ES: `result.xbest`), as the official code does;
- M2N2: deltatune.merging.search.m2n2 with the official defaults (population 20, alpha 1, attraction, split point,
  mutation N(0, 0.01^2)), two N(0, 0.01^2) seed models; the seeds' two evaluations count towards the budget;
- CMA-ES: pycma, x0 ~ N(0, 0.01^2), sigma0 = 0.01, popsize 20 (official); `sep_cma_es` is the diagonal
  variant (`CMA_diagonal=True`), an extra baseline that scales to the paper's size;
- run r uses seed 42 + r (official); methods alternate within each seed; one thread each.

Every finished (method, seed) run is appended to `<out-dir>/<name>.jsonl` (deltatune.bench.harness's run log, keyed
by the run's settings too), so an interrupted benchmark resumes; `--render` re-writes the table and plot from it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/m2n2_vs_cmaes.py --seeds 3 --evaluations 20000
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/m2n2_vs_cmaes.py --render
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import cma  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402
from deltatune.merging.search.m2n2 import Archive, M2N2Config, evolve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
INPUTS, CLASSES, POPULATION, INIT_STD = 64, 10, 20, 0.01


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_split(split: str) -> Digits:
    images, labels = load_digits(return_X_y=True)
    if split == "paper":  # data.py: first 80% train, the rest test, no shuffling
        cut = int(len(images) * 0.8)
        parts = images[:cut], images[cut:], labels[:cut], labels[cut:]
    else:
        parts = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    x_train, x_test, y_train, y_test = parts
    as_float = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return Digits(as_float(x_train), torch.tensor(y_train), as_float(x_test), torch.tensor(y_test))


def parameter_count(hidden: int) -> int:
    return (INPUTS + 1) * hidden + (hidden + 1) * CLASSES


def mlp_logits(params: torch.Tensor, inputs: torch.Tensor, hidden: int) -> torch.Tensor:
    """The official model.mlp layout: w1 (64, h), b1 (h), w2 (h, 10), b2 (10), row-major in one vector."""
    end_w1 = INPUTS * hidden
    w1, b1 = params[:end_w1].view(INPUTS, hidden), params[end_w1:end_w1 + hidden]
    start_w2 = end_w1 + hidden
    w2 = params[start_w2:start_w2 + hidden * CLASSES].view(hidden, CLASSES)
    b2 = params[start_w2 + hidden * CLASSES:]
    return torch.relu(inputs @ w1 + b1) @ w2 + b2


def correct(params: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, hidden: int) -> torch.Tensor:
    return (mlp_logits(params, inputs, hidden).argmax(dim=1) == labels).float()


@dataclass
class Curve:
    """Best training accuracy so far and the test accuracy of that model, at logged evaluation counts."""

    evaluations: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    seconds: float = 0.0


def run_m2n2(data: Digits, hidden: int, budget: int, seed: int, log_every: int, **overrides) -> Curve:
    generator = torch.Generator().manual_seed(seed)
    seeds = [torch.randn(parameter_count(hidden), generator=generator) * INIT_STD for _ in range(2)]
    curve = Curve()

    def log(evaluations: int, archive: Archive) -> None:
        if evaluations % log_every == 0:
            best = archive.best_index()
            curve.evaluations.append(evaluations)
            curve.train.append(float(archive.member_scores[best].mean()))
            curve.test.append(float(correct(archive.members[best], data.x_test, data.y_test, hidden).mean()))

    config = M2N2Config(population_size=POPULATION, total_evaluations=budget - len(seeds), **overrides)
    start = time.perf_counter()
    evolve(seeds, lambda p: correct(p, data.x_train, data.y_train, hidden), config, seed=seed, callback=log,
           progress=False)
    curve.seconds = time.perf_counter() - start
    return curve


def run_cma(data: Digits, hidden: int, budget: int, seed: int, log_every: int, diagonal: bool) -> Curve:
    x0 = np.random.default_rng(seed).normal(size=parameter_count(hidden)) * INIT_STD
    options = {"popsize": POPULATION, "seed": seed, "verbose": -9, "CMA_diagonal": diagonal}
    solver = cma.CMAEvolutionStrategy(x0, INIT_STD, options)
    curve = Curve()
    start = time.perf_counter()
    for generation in range(budget // POPULATION):
        candidates = solver.ask()
        params = torch.tensor(np.asarray(candidates), dtype=torch.float32)
        accuracies = [float(correct(p, data.x_train, data.y_train, hidden).mean()) for p in params]
        solver.tell(candidates, [-a for a in accuracies])  # cma minimizes
        evaluations = (generation + 1) * POPULATION
        if evaluations % log_every == 0:
            best = torch.tensor(solver.result.xbest, dtype=torch.float32)
            curve.evaluations.append(evaluations)
            curve.train.append(-float(solver.result.fbest))
            curve.test.append(float(correct(best, data.x_test, data.y_test, hidden).mean()))
    curve.seconds = time.perf_counter() - start
    return curve


METHODS: dict[str, Callable[..., Curve]] = {
    "m2n2": run_m2n2,
    "cma_es": lambda *a, **k: run_cma(*a, **k, diagonal=False),
    "sep_cma_es": lambda *a, **k: run_cma(*a, **k, diagonal=True),
    "m2n2_no_attraction": lambda *a, **k: run_m2n2(*a, **k, use_attraction=False),
    "ga": lambda *a, **k: run_m2n2(*a, **k, alpha=0.0, use_attraction=False),
}
LABELS = {"m2n2": "M2N2", "cma_es": "CMA-ES (full)", "sep_cma_es": "sep-CMA-ES (diagonal)",
          "m2n2_no_attraction": "M2N2 w/o attraction", "ga": "GA (alpha=0, no attraction)"}


def value_at(curve: dict, evaluations: int, key: str) -> float:
    return curve[key][curve["evaluations"].index(evaluations)]


def summary_table(runs: dict[str, list[dict]], checkpoints: list[int]) -> list[str]:
    header = "| method | " + " | ".join(f"test @ {c:,}" for c in checkpoints) + " | train @ end | s / run |"
    lines = [header, "|---" * (len(checkpoints) + 3) + "|"]
    for method, curves in runs.items():
        tests = [mean_std([value_at(c, point, "test") for c in curves]) for point in checkpoints]
        train = mean_std([c["train"][-1] for c in curves])
        seconds = statistics.mean(c["seconds"] for c in curves)
        lines.append(f"| {LABELS[method]} | " + " | ".join(tests) + f" | {train} | {seconds:.0f} |")
    return lines


def raw_table(runs: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    lines = ["| method | seed | final train | final test | best-train curve (test) at every logged point | s |",
             "|---|---|---|---|---|---|"]
    for method, curves in runs.items():
        for seed, curve in zip(seeds, curves):
            points = " ".join(f"{100 * t:.1f}" for t in curve["test"])
            lines.append(f"| {method} | {seed} | {100 * curve['train'][-1]:.2f} | {100 * curve['test'][-1]:.2f} "
                         f"| {points} | {curve['seconds']:.1f} |")
    return lines


def plot(runs: dict[str, list[dict]], title: str):
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for method, curves in runs.items():
        x = np.asarray(curves[0]["evaluations"])
        for axis, key in zip(axes, ("train", "test")):
            values = np.asarray([c[key] for c in curves]) * 100
            mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(curves) > 1 else 0 * values[0]
            axis.plot(x, mean, label=LABELS[method])
            axis.fill_between(x, mean - std, mean + std, alpha=0.2)
    for axis, name in zip(axes, ("best training accuracy (fitness)", "test accuracy of the best-training model")):
        axis.set_xlabel("fitness evaluations (forward passes over the training set)")
        axis.set_ylabel(f"{name} (%)")
        axis.grid(alpha=0.3)
    axes[1].legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--evaluations", type=int, default=20_000)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--split", choices=("paper", "stratified"), default="paper")
    parser.add_argument("--methods", default="m2n2,cma_es,sep_cma_es")
    parser.add_argument("--name", default="m2n2_vs_cmaes", help="base name of the .md and .png written")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--render", action="store_true", help="only re-write the table and plot from the JSONL")
    arguments = parser.parse_args()
    if arguments.evaluations % arguments.log_every or arguments.log_every % POPULATION:
        parser.error("--evaluations must be a multiple of --log-every, itself a multiple of 20 (the popsize)")
    return arguments


# a run is (method, seed) at these settings (record key -> argument; a curve's own `evaluations` is its x axis)
SETTINGS = {"budget": "evaluations", "hidden": "hidden", "log_every": "log_every", "split": "split"}


def run_identity(arguments: argparse.Namespace):
    def identity(job_or_record: dict) -> list | None:
        keys = ("method", "seed", *SETTINGS)
        if not all(key in job_or_record for key in keys):
            return None
        return [job_or_record[key] for key in keys]

    return identity


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(1)
    data = load_split(arguments.split)
    methods = arguments.methods.split(",")
    seeds = [42 + run for run in range(arguments.seeds)]
    settings = {key: getattr(arguments, name) for key, name in SETTINGS.items()}
    log = harness.RunLog(Path(arguments.out_dir) / f"{arguments.name}.jsonl", identity=run_identity(arguments))
    # alternate methods within a seed so machine drift hits all of them
    jobs = [{"method": method, "seed": seed, **settings} for seed in seeds for method in methods]

    def run(job: dict) -> dict:
        curve = METHODS[job["method"]](data, job["hidden"], job["budget"], job["seed"], job["log_every"])
        print(f"{job['method']} seed {job['seed']}: train {curve.train[-1]:.4f} test {curve.test[-1]:.4f} "
              f"({curve.seconds:.0f} s)", flush=True)
        return {**job, **curve.__dict__, "environment": harness.environment(threads=1)}

    if not arguments.render:
        harness.run_jobs(jobs, log, run)
    records = log.records()
    runs = {method: [log.find(job, records) for job in jobs if job["method"] == method] for method in methods}
    missing = [f"{m} seed {j['seed']}" for m in methods for j, r in zip([j for j in jobs if j["method"] == m], runs[m])
               if r is None]
    if missing:
        raise SystemExit(f"{log.path} lacks the runs {', '.join(missing)}; run without --render to compute them")
    write_report(arguments, data, runs, seeds)


def write_report(arguments: argparse.Namespace, data: Digits, runs: dict[str, list[dict]], seeds: list[int]) -> None:
    dimension = parameter_count(arguments.hidden)
    budget = arguments.evaluations
    checkpoints = sorted({budget // 10, budget // 4, budget // 2, budget} & set(runs[next(iter(runs))][0]
                                                                               ["evaluations"]))
    png = Path(arguments.out_dir) / f"{arguments.name}.png"
    title = (f"digits MLP 64-{arguments.hidden}-10 ({dimension:,} params) from scratch, "
             f"{len(seeds)} seeds, mean ± std")
    env = runs[next(iter(runs))][0].get("environment", {})
    command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/m2n2_vs_cmaes.py "
               f"--seeds {arguments.seeds} --evaluations {budget} --hidden {arguments.hidden} "
               f"--log-every {arguments.log_every} --split {arguments.split} --methods {arguments.methods}"
               + (f" --name {arguments.name}" if arguments.name != "m2n2_vs_cmaes" else ""))
    lines = [
        f"# M2N2 vs CMA-ES: digits MLP from scratch ({arguments.name})", "",
        f"- command: `{command}`",
        f"- environment: {harness.environment_line(env)} numpy {np.__version__}, cma {cma.__version__}; "
        "1 thread per run, runs one at a time on a shared machine",
        f"- data: sklearn digits, split `{arguments.split}` ({len(data.y_train)} train / {len(data.y_test)} test), "
        f"raw pixels 0..16; model: MLP 64-{arguments.hidden}-10, D = {dimension:,} parameters",
        f"- budget: {budget:,} fitness evaluations per run (fitness = training accuracy); seeds {seeds}",
        f"- full CMA-ES covariance state (C and its eigenbasis B, float64): "
        f"{2 * dimension ** 2 * 8 / 1e6:,.0f} MB here; {2 * parameter_count(256) ** 2 * 8 / 1e9:.1f} GB at the "
        "paper's 19,210 parameters (computed from sizes). M2N2's state: 20 vectors + a 20 x N score matrix.",
        "", f"![curves]({png.name})", "",
        "## Test accuracy (%) of the best-training model, mean ± std over seeds", "",
        *summary_table(runs, checkpoints), "",
        f"## Raw numbers (%; curve points every {arguments.log_every} evaluations)", "",
        *raw_table(runs, seeds), "",
    ]
    harness.write_report(Path(arguments.out_dir) / f"{arguments.name}.md", "\n".join(lines), {png: plot(runs, title)})


if __name__ == "__main__":
    main()

"""`deltatune compare`: several methods on one built-in task, several seeds each, one table.

Every run is the recipe of `deltatune train` (`recipe.finetune`) with the same task, data subset, schedule and
seeds; only the method (and its own hyper-parameters and learning rate) changes. Finished runs are appended to
`runs.jsonl` in the output folder, so an interrupted comparison resumes where it stopped (a run is reused only
when every setting that shapes it is equal). The summary (mean ± sample std over seeds) is written atomically as
`results.md`, and with `plot=True` as a bar chart `results.png`. The loop, the run log and the report writing
are the benchmark harness's (deltatune.bench.harness).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.bench.harness import RunLog, mean_std, pyplot, run_jobs, write_report
from deltatune.errors import ConfigError

RUNS_FILE, TABLE_FILE, PLOT_FILE = "runs.jsonl", "results.md", "results.png"


@dataclass(frozen=True)
class MethodSummary:
    method: str
    trainable: int
    share: float
    test: list[float]
    validation: list[float]
    seconds: list[float]
    metric: str = "accuracy"
    higher_is_better: bool = True

    @property
    def test_mean(self) -> float:
        return statistics.mean(self.test)

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test) if len(self.test) > 1 else 0.0


def check_request(methods: Sequence[str], seeds: Sequence[int]) -> None:
    """Refuse an empty or repeated method list and an empty seed list before anything trains."""
    if not methods:
        raise ConfigError("no methods to compare; name at least one, e.g. `deltatune compare lora probe`")
    repeated = sorted({m for m in methods if list(methods).count(m) > 1})
    if repeated:
        raise ConfigError(f"method {repeated[0]!r} is listed twice; list each method once")
    if not seeds:
        raise ConfigError("no seeds; give at least one, e.g. --seeds 0,1,2")


def check_configs(methods: Sequence[str], params: Mapping[str, Mapping[str, Any]]) -> None:
    """Build every method's config once, so a bad name or hyper-parameter stops the comparison before the
    first run instead of after hours of the others."""
    import deltatune as dt
    from deltatune.recipe import FULL, PROBE

    for method in methods:
        if method in (PROBE, FULL):
            if params.get(method):
                raise ConfigError(f"{method} takes no hyper-parameters; drop -p {method}:...")
            continue
        dt.config_for(method, **params.get(method, {}))
    unknown = sorted(set(params) - set(methods))
    if unknown:
        raise ConfigError(f"hyper-parameters given for {unknown[0]!r}, which is not compared; add it to the "
                          "methods or drop its -p")


def run_settings(task: str, method: str, params: Mapping[str, Any], seed: int, lr: float | None,
                 train: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that shapes one run (JSON-ready), the key under which it is stored and reused."""
    return json.loads(json.dumps({"task": task, "method": method, "params": dict(params), "seed": seed, "lr": lr,
                                  **train}, default=list))


def compare(task: str, methods: Sequence[str], params: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], *,
            out_dir: str | Path, lr: Mapping[str, float] | None = None, plot: bool = False,
            **train: Any) -> list[MethodSummary]:
    """Train every method on every seed (reusing finished runs), write the table (and plot), return summaries.

    params: per-method config keyword arguments; lr: per-method learning rates (default: the recipe's);
    train: `recipe.finetune` settings shared by all runs (epochs, batch_size, train_size, max_steps, ...).
    """
    check_request(methods, seeds)
    check_configs(methods, params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / RUNS_FILE, identity=("settings",))
    jobs = {(m, s): {"settings": run_settings(task, m, params.get(m, {}), s, (lr or {}).get(m), train)}
            for m in methods for s in seeds}
    run_jobs(jobs.values(), log, lambda job: train_one(job["settings"], params, train, out),
             describe=lambda job: f"{job['settings']['method']}, seed {job['settings']['seed']}")
    done = log.records()
    summaries = [summarize(method, [log.find(jobs[method, s], done) for s in seeds]) for method in methods]
    figures = {out / PLOT_FILE: plot_summaries(summaries, task)} if plot else {}
    write_report(out / TABLE_FILE, render_table(summaries, task, seeds), figures)
    return summaries


def train_one(settings: dict[str, Any], params: Mapping[str, Mapping[str, Any]], train: Mapping[str, Any],
              out: Path) -> dict[str, Any]:
    """One run through the recipe; its record holds the settings that identify it in `runs.jsonl`."""
    import deltatune.recipe

    method = settings["method"]
    result = deltatune.recipe.finetune(settings["task"], method, dict(params.get(method, {})),
                                       seed=settings["seed"], lr=settings["lr"], out_dir=out / run_folder(settings),
                                       **train)
    print(f"      test {result.metric} {result.test_score:.4f}", flush=True)
    return {"settings": settings, "test": result.test_score, "validation": result.validation_score,
            "trainable": result.trainable.trainable, "share": result.trainable.share, "seconds": result.seconds,
            "metric": result.metric, "higher_is_better": result.higher_is_better}


def run_folder(settings: dict[str, Any]) -> str:
    """Adapter and metrics folder of one run: other settings of the same method and seed get their own."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings['method']}-seed{settings['seed']}-{digest}"


def summarize(method: str, runs: list[dict[str, Any]]) -> MethodSummary:
    # Records written before tasks had other metrics than accuracy carry no "metric" key.
    return MethodSummary(method, runs[0]["trainable"], runs[0]["share"], [r["test"] for r in runs],
                         [r["validation"] for r in runs], [r["seconds"] for r in runs],
                         runs[0].get("metric", "accuracy"), runs[0].get("higher_is_better", True))


def _metric_scale(summary: MethodSummary) -> tuple[float, str]:
    """Accuracy is shown in %, other metrics as they are."""
    return (100.0, "accuracy in %") if summary.metric == "accuracy" else (1.0, summary.metric)


def ranked(summaries: list[MethodSummary]) -> list[MethodSummary]:
    """Best mean test score first, in the direction of the task's metric."""
    return sorted(summaries, key=lambda s: -s.test_mean if s.higher_is_better else s.test_mean)


def render_table(summaries: list[MethodSummary], task: str, seeds: Sequence[int]) -> str:
    scale, unit = _metric_scale(summaries[0])
    direction = "" if summaries[0].higher_is_better else " (lower is better)"
    digits = 1 if scale == 100.0 else 4
    lines = [f"Task {task}, seeds {', '.join(map(str, seeds))}: {unit}{direction}, mean ± std over seeds.", "",
             "| method | trainable | share | test | validation | seconds / run |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in ranked(summaries):
        lines.append(f"| {s.method} | {s.trainable:,} | {100 * s.share:.3f}% | "
                     f"{mean_std(s.test, scale=scale, digits=digits)} | "
                     f"{mean_std(s.validation, scale=scale, digits=digits)} | {statistics.mean(s.seconds):.1f} |")
    return "\n".join(lines) + "\n"


def plot_summaries(summaries: list[MethodSummary], task: str) -> Any:
    """Test score per method (bars: mean, whiskers: ±1 std, dots: the seeds), as a matplotlib figure."""
    plt = pyplot()
    scale, unit = _metric_scale(summaries[0])
    figure, axis = plt.subplots(figsize=(1.2 * len(summaries) + 2.5, 3.8))
    positions = range(len(summaries))
    axis.bar(positions, [scale * s.test_mean for s in summaries], yerr=[scale * s.test_std for s in summaries],
             capsize=4, color="#8fb3d9")
    for position, s in zip(positions, summaries):
        axis.scatter([position] * len(s.test), [scale * v for v in s.test], color="#1f3b5c", s=12, zorder=3)
    axis.set_xticks(list(positions), [f"{s.method}\n{s.trainable:,}" for s in summaries])
    if scale == 100.0:  # accuracy: zoom on the range the methods span
        low = min(min(s.test) for s in summaries) * 100
        axis.set_ylim(max(0.0, low - 5), min(100.0, max(max(s.test) for s in summaries) * 100 + 2))
    direction = "" if summaries[0].higher_is_better else ", lower is better"
    axis.set_ylabel(f"test {unit.replace('accuracy in %', 'accuracy (%)')}{direction}")
    axis.set_title(f"{task}: method (trainable parameters)")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure

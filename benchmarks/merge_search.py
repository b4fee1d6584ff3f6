"""Cheap merge-setting selection: the CMA-ES search of `deltatune merge --search` against the full grid.

The merges are those of the two merging studies, with their experts and evaluators imported from them:
- **vision** (`merge_vision.py`): the three ViT full fine-tunes (handwritten-vit, glyphs-novel-vit,
  glyphs-rotated-vit; each keeps its own head); objective: mean validation accuracy on 300 images per task;
- **wordnet** (`merge_wordnet.py`): the four MiniLM full fine-tunes (wordnet-nouns/verbs/pos/adj; each keeps its
  own head); objective: mean validation accuracy on the first --wordnet-validation glosses per task (ours: 100,
  not the study's 300, so that 150 evaluations fit the slot), test on the first --wordnet-test glosses per task.

The merge is TIES with the paper's defaults (`semantics: paper`: whole-model trim, unweighted election) and two
free settings, the density kept per model and the scaling λ. Contenders, on the same objective:
- **grid**: density {0.1, 0.2, 0.3, 0.5, 0.7, 1.0} × λ {0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0} (the merge
  studies' λ grid): 54 evaluations; also read at the paper's density 0.2 alone (λ tuned: 9 evaluations);
- **CMA-ES** (`deltatune.merging.search.settings.search_settings`) over density ∈ [0.1, 1], λ ∈ [0.1, 2] (the
  grid's hull), seeds 0, 1, 2, budget 32; its picks at budgets 8 and 16 are the best of the run's first 8 / 16
  evaluations, which is exactly what a budget-8 / 16 run picks (the run is a prefix of itself:
  tests/merging/test_merge_search.py::test_a_shorter_budget_is_a_prefix_of_a_longer_one).
Each pick is then scored once on the test subsets. Every (setting, split) evaluation is cached with its
seconds in `<work>/search-<family>[-v<validation>-t<test>].json`, so an interrupted run resumes; each family is
one record of `<vision work>/search-stages.jsonl`; `--render` re-writes the report from `--json`.

"Matches the grid's best" (fixed before the run): at a budget, the three seeds' picks have a mean test accuracy
at least the grid pick's minus 1 point, and each pick's validation score is at least the grid best's minus 1 point.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_search.py --stages vision wordnet
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_search.py --render
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import merge_vision  # noqa: E402
import merge_wordnet  # noqa: E402
from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402
from deltatune.merging import merge_state_dicts  # noqa: E402
from deltatune.merging.methods.ties import TiesModelParams, TiesParams  # noqa: E402
from deltatune.merging.search.settings import SettingsRecord, grid_settings, search_settings  # noqa: E402
from deltatune.merging.search.space import Dimension, SearchSpace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSITY, LAMBDA = "parameters.density", "parameters.lambda"
DENSITY_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
LAMBDA_GRID = merge_vision.LAMBDA_GRID
PAPER_DENSITY = 0.2  # TIES' default k = 20% (Yadav et al. 2023)
SPACE = SearchSpace((Dimension(("parameters", "density"), min(DENSITY_GRID), max(DENSITY_GRID)),
                     Dimension(("parameters", "lambda"), min(LAMBDA_GRID), max(LAMBDA_GRID))))
BUDGETS, SEEDS = (8, 16, 32), (0, 1, 2)
MATCH_POINTS = 1.0
FAMILIES = ("vision", "wordnet")
COMMAND = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_search.py --stages vision wordnet"


@dataclass
class Family:
    """One merge task: the base, the task vectors, and per-task accuracy of a merged backbone on a split."""

    tasks: tuple[str, ...]
    base: dict
    vectors: list[dict]
    per_task: Callable[[dict, str], dict[str, float]]
    protocol: str


def vision_family(work: Path, _args) -> Family:
    subjects = {name: merge_vision.TaskModel(name) for name in merge_vision.MERGE_TASKS}
    finetunes = {name: merge_vision.finetune(name, work) for name in merge_vision.MERGE_TASKS}
    first = subjects[merge_vision.MERGE_TASKS[0]]

    def per_task(state: dict, which: str) -> dict[str, float]:
        return {name: subject.accuracy(subject.with_vector(finetunes[name], state), which)
                for name, subject in subjects.items()}

    return Family(merge_vision.MERGE_TASKS, first.vector_part(first.base),
                  [subjects[name].vector_part(finetunes[name]) for name in merge_vision.MERGE_TASKS], per_task,
                  f"validation {merge_vision.VALIDATION_SIZE} images per task, the whole test splits")


def wordnet_family(work: Path, args) -> Family:
    backbone = merge_wordnet.load_minilm_backbone()
    base = {k: v.clone() for k, v in backbone.state_dict().items()}
    for task in merge_wordnet.TASKS:
        merge_wordnet.finetune(task, work)
    splits = {}
    for task in merge_wordnet.TASKS:
        split = merge_wordnet.eval_splits(task)
        split["validation"] = split["validation"].subset(range(args.wordnet_validation))
        split["test"] = split["test"].subset(range(args.wordnet_test))
        splits[task] = split
    heads = {task: load_file(work / f"{task}.head.safetensors") for task in merge_wordnet.TASKS}

    def per_task(state: dict, which: str) -> dict[str, float]:
        return merge_wordnet.per_task(backbone, state, heads, splits, which)

    return Family(merge_wordnet.TASKS, base, [load_file(work / f"{t}.safetensors") for t in merge_wordnet.TASKS],
                  per_task, f"validation {args.wordnet_validation} glosses per task, test {args.wordnet_test}")


BUILDERS = {"vision": vision_family, "wordnet": wordnet_family}


def ties_merge(family: Family, setting: dict[str, float]) -> dict:
    params = TiesParams(scaling=setting[LAMBDA])
    per_model = [TiesModelParams(density=setting[DENSITY])] * len(family.vectors)
    return merge_state_dicts("ties", family.base, family.vectors, params, per_model)


class Scorer:
    """Cached (setting, split) -> per-task accuracies, and the seconds the first evaluation took."""

    def __init__(self, family: Family, cache: merge_wordnet.EvaluationCache) -> None:
        self.family, self.cache = family, cache

    def entry(self, setting: dict[str, float], which: str) -> dict:
        def compute() -> dict:
            start = time.perf_counter()
            accuracies = self.family.per_task(ties_merge(self.family, setting), which)
            return {"tasks": accuracies, "seconds": time.perf_counter() - start}
        return self.cache.get(f"{setting[DENSITY]!r}|{setting[LAMBDA]!r}|{which}", compute)

    def objective(self, setting: dict[str, float]) -> tuple[float, dict[str, float]]:
        tasks = self.entry(setting, "validation")["tasks"]
        return statistics.mean(tasks.values()), tasks

    def test(self, setting: dict[str, float]) -> float:
        return statistics.mean(self.entry(setting, "test")["tasks"].values())

    def seconds(self, record: SettingsRecord, count: int | None = None) -> float:
        """Wall seconds of the record's first `count` evaluations as first computed (not the cache look-ups)."""
        return sum(self.entry(e.setting, "validation")["seconds"] for e in record.evaluations[:count])


def pick(scorer: Scorer, record: SettingsRecord, count: int | None = None) -> dict:
    best = record.best_within(count)
    return {"setting": best.setting, "validation": best.score, "test": scorer.test(best.setting),
            "evaluations": count or len(record.evaluations), "seconds": scorer.seconds(record, count)}


def run_family(name: str, work: Path, args) -> dict:
    started = time.perf_counter()
    family = BUILDERS[name](work, args)
    sizes = f"-v{args.wordnet_validation}-t{args.wordnet_test}" if name == "wordnet" else ""  # a cache per protocol
    scorer = Scorer(family, merge_wordnet.EvaluationCache(work / f"search-{name}{sizes}.json"))
    grid = grid_settings(SPACE, scorer.objective, {DENSITY: DENSITY_GRID, LAMBDA: LAMBDA_GRID})
    paper_row = [e for e in grid.evaluations if e.setting[DENSITY] == PAPER_DENSITY]
    paper_best = max(paper_row, key=lambda e: e.score)
    searches = [search_settings(SPACE, scorer.objective, budget=max(BUDGETS), seed=seed) for seed in SEEDS]
    result = {
        "family": name, "tasks": list(family.tasks), "protocol": family.protocol,
        "grid": {**pick(scorer, grid), "record": grid.to_dict()},
        "grid_paper_density": {"setting": paper_best.setting, "validation": paper_best.score,
                               "test": scorer.test(paper_best.setting), "evaluations": len(paper_row),
                               "seconds": sum(scorer.entry(e.setting, "validation")["seconds"] for e in paper_row)},
        "search": [{"seed": seed, "record": record.to_dict(),
                    "picks": {str(b): pick(scorer, record, b) for b in BUDGETS}}
                   for seed, record in zip(SEEDS, searches)],
        "evaluation_seconds_median": statistics.median(scorer.entry(e.setting, "validation")["seconds"]
                                                      for e in grid.evaluations),
    }
    for budget in BUDGETS:
        tests = [run["picks"][str(budget)]["test"] for run in result["search"]]
        print(f"{name}: budget {budget}: test {statistics.mean(tests):.4f} vs grid {result['grid']['test']:.4f}",
              flush=True)
    return {**result, "seconds": time.perf_counter() - started}


# --- report ----------------------------------------------------------------------------------------------------
def verdict(record: dict, budget: int) -> tuple[bool, float, float]:
    """(matches, mean test gap to the grid pick, worst validation gap to the grid best), in points."""
    picks = [run["picks"][str(budget)] for run in record["search"]]
    test_gap = 100 * (statistics.mean(p["test"] for p in picks) - record["grid"]["test"])
    validation_gap = 100 * min(p["validation"] - record["grid"]["validation"] for p in picks)
    return test_gap >= -MATCH_POINTS and validation_gap >= -MATCH_POINTS, test_gap, validation_gap


def _setting(setting: dict) -> str:
    return f"{setting[DENSITY]:.3g} / {setting[LAMBDA]:.3g}"


def _family_table(record: dict) -> list[str]:
    grid = record["grid"]
    lines = [f"### {record['family']}: TIES over {', '.join(record['tasks'])}", "",
             f"Protocol: {record['protocol']}; one evaluation (merge + validation) takes "
             f"{record['evaluation_seconds_median']:.1f} s (median over the grid).", "",
             "| strategy | evaluations (ratio to grid) | density / λ picked | validation mean | test mean | "
             "seconds of evaluations | matches the grid's best |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- |",
             f"| full grid | {grid['evaluations']} (1.00x) | {_setting(grid['setting'])} | "
             f"{100 * grid['validation']:.1f} | {100 * grid['test']:.1f} | {grid['seconds']:.0f} | – |"]
    paper = record["grid_paper_density"]
    lines.append(f"| grid at the paper's density {PAPER_DENSITY} (λ tuned) | {paper['evaluations']} "
                 f"({paper['evaluations'] / grid['evaluations']:.2f}x) | {_setting(paper['setting'])} | "
                 f"{100 * paper['validation']:.1f} | {100 * paper['test']:.1f} | {paper['seconds']:.0f} | – |")
    for budget in BUDGETS:
        picks = [run["picks"][str(budget)] for run in record["search"]]
        matches, test_gap, validation_gap = verdict(record, budget)
        settings = "; ".join(_setting(p["setting"]) for p in picks)
        lines.append(f"| CMA-ES, {len(picks)} seeds | {budget} ({budget / grid['evaluations']:.2f}x) | {settings} | "
                     f"{mean_std([p['validation'] for p in picks])} | {mean_std([p['test'] for p in picks])} | "
                     f"{statistics.mean(p['seconds'] for p in picks):.0f} | "
                     f"{'**holds**' if matches else '**does not hold**'} (test {test_gap:+.1f}, "
                     f"worst validation {validation_gap:+.1f} points) |")
    return lines + [""]


def _grid_table(record: dict) -> list[str]:
    evaluations = record["grid"]["record"]["evaluations"]
    values = {(e["setting"][DENSITY], e["setting"][LAMBDA]): e["score"] for e in evaluations}
    lines = [f"Validation mean accuracy of the grid ({record['family']}; rows density, columns λ):", "",
             "| density | " + " | ".join(map(str, LAMBDA_GRID)) + " |",
             "| ---: | " + " | ".join("---:" for _ in LAMBDA_GRID) + " |"]
    lines += [f"| {d} | " + " | ".join(f"{100 * values[(d, lam)]:.1f}" for lam in LAMBDA_GRID) + " |"
              for d in DENSITY_GRID]
    return lines + [""]


def report(payload: dict) -> str:
    env = payload.get("environment", {})
    stages = [f for f in FAMILIES if f in payload]
    lines = ["# Merge-setting search (CMA-ES) vs the full grid: TIES density and λ", "",
             f"Measured {harness.environment_line(env) if env else '?'}; seconds per stage (fine-tunes cached "
             "beforehand): " + ", ".join(f"{s} {payload[s]['seconds']:.0f}" for s in stages), "",
             f"    {COMMAND}", "",
             "Protocol: the docstring of `benchmarks/merge_search.py`. Accuracies in %; CMA-ES rows give mean ± std "
             f"over seeds {', '.join(map(str, SEEDS))} and each seed's pick. \"Matches\": mean test ≥ grid pick's − "
             f"{MATCH_POINTS:g} point and every seed's validation ≥ grid best's − {MATCH_POINTS:g} point.", ""]
    for stage in stages:
        lines += _family_table(payload[stage])
    lines += ["![best validation so far against evaluations](merge_search.png)", ""]
    for stage in stages:
        lines += _grid_table(payload[stage])
    return "\n".join(lines) + "\n"


def figure(payload: dict):
    """Best validation score so far against evaluations spent: each CMA-ES seed, and the grid's best."""
    plt = harness.pyplot()
    stages = [f for f in FAMILIES if f in payload]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
    for axis, stage in zip(axes[0], stages):
        record = payload[stage]
        for run in record["search"]:
            scores = [e["score"] for e in run["record"]["evaluations"]]
            best = [100 * max(scores[: i + 1]) for i in range(len(scores))]
            axis.plot(range(1, len(best) + 1), best, label=f"CMA-ES seed {run['seed']}")
        grid_scores = [e["score"] for e in record["grid"]["record"]["evaluations"]]
        axis.axhline(100 * max(grid_scores), color="black", linestyle="--",
                     label=f"grid best ({len(grid_scores)} evaluations)")
        for budget in BUDGETS:
            axis.axvline(budget, color="grey", linewidth=0.5)
        axis.set(title=f"{stage}: TIES density × λ", xlabel="evaluations", ylabel="best validation mean accuracy (%)")
        axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="*", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--vision-work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-merge-vision")
    parser.add_argument("--wordnet-work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-merge-wordnet")
    parser.add_argument("--wordnet-validation", type=int, default=100)
    parser.add_argument("--wordnet-test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/merge_search.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/merge_search.json")
    parser.add_argument("--render", action="store_true", help="only re-write --output from the --json file")
    args = parser.parse_args()
    if not args.render:
        torch.set_num_threads(args.threads)
        works = {"vision": args.vision_work, "wordnet": args.wordnet_work}
        log = harness.RunLog(args.vision_work / "search-stages.jsonl", identity=("family",))
        for work in works.values():
            work.mkdir(parents=True, exist_ok=True)
        harness.run_jobs([{"family": s} for s in args.stages], log,
                         lambda job: run_family(job["family"], works[job["family"]], args))
        payload = {r["family"]: r for r in log.records()}
        payload["environment"] = harness.environment(threads=args.threads, command=COMMAND)
        harness.write_json(args.json, payload)
    payload = json.loads(args.json.read_text())
    harness.write_report(args.output, report(payload), {args.output.with_suffix(".png"): figure(payload)})
    print(args.output.read_text())


if __name__ == "__main__":
    main()

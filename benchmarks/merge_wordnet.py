"""Delta pruning and multi-task merging of real fine-tunes of all-MiniLM-L6-v2 on four WordNet 3.0 tasks.

Fine-tunes (made by the stage that needs them, cached in --work): full fine-tuning of the embedded default
backbone (MiniLM + mean pooling + a Linear head) on each of `wordnet-nouns`, `wordnet-verbs`, `wordnet-pos`,
`wordnet-adj`, with the recipe's full-fine-tuning rate 5e-5, AdamW, linear decay, batch 32, 2 epochs over a
label-stratified 1,000-example subset of each training split (seed 0). A task vector is the fine-tuned backbone
minus the base backbone; every floating tensor of the backbone (embeddings, attention, MLP, LayerNorm) is pruned /
merged, and each task keeps its own trained head.

1. **DARE vs DAREx-q** on a longer `wordnet-nouns` fine-tune (the whole 4,000-gloss training split, 2 epochs =
   250 steps, so the delta is larger than the merge fine-tunes'), drop rates p = 0.5 / 0.9 / 0.99, three drop seeds:
   - DARE: keep 1 − p of the delta entries, rescale by 1/(1 − p) (Yu et al. 2024);
   - DAREx-q (labelled): one global q in [1 − p, 1] maximising the accuracy on 300 validation glosses (drop
     seed 0), found by `search_rescale_q` (the official coarse-then-fine grid);
   - DAREx-q (unlabelled): the same search minimising the mean absolute change of the pooled embeddings of 64
     unlabelled validation glosses, averaged over drop seeds 0–3 with the outlier removed (`seed_averaged`).
   The q found is then evaluated with seeds 0, 1, 2 on the test subset.
2. **Multi-task merge** of the four task vectors: task arithmetic, TIES (density 0.2, whole-model trim), DARE-TIES
   (density 0.1), PCB (density 0.1, whole-model scope), each with the papers' defaults (`semantics: paper`). The
   one free coefficient (λ: TA/TIES/DARE-TIES scaling, PCB's uniform λ_i) is chosen per method from the same grid
   on the mean validation accuracy over the four tasks (300 glosses each); then test accuracy per task.
   Merge evaluations are cached in --work (`evaluations.json`), so a wider grid only computes the new points.

Test subsets: the first 1,000 glosses of each fixed test split (the splits are shuffled once at build time).

Each finished stage is one record of `<work>/stages.jsonl` (deltatune.bench.harness's run log: a re-run skips
finished stages; two stages may run side by side in two processes). The report's raw numbers go to `--json`;
`--render` re-writes the report from that JSON without running anything. `--work` defaults to the system's
temporary folder.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_wordnet.py                 # both stages, then the report
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_wordnet.py --stage prune   # or side by side: prune | merge,
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_wordnet.py --stage merge   # then --stage report
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_wordnet.py --render        # the report from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.data.models import load_minilm_backbone, masked_mean  # noqa: E402
from deltatune.merging import merge_state_dicts  # noqa: E402
from deltatune.merging.methods.dare import DareModelParams, DareTiesParams  # noqa: E402
from deltatune.merging.methods.darex import DarexModelParams, DarexParams  # noqa: E402
from deltatune.merging.methods.pcb import PCBModelParams, PCBParams  # noqa: E402
from deltatune.merging.methods.task_arithmetic import TaskArithmeticParams  # noqa: E402
from deltatune.merging.methods.ties import TiesModelParams, TiesParams  # noqa: E402
from deltatune.merging.search.darex_q import output_change, search_rescale_q, seed_averaged  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("wordnet-nouns", "wordnet-verbs", "wordnet-pos", "wordnet-adj")
PRUNE_TASK = "wordnet-nouns"
TRAIN_SIZE, EPOCHS, BATCH, LR, MAX_LENGTH = 1000, 2, 32, 5e-5, 32
PRUNE_TRAIN_SIZE = None  # the whole training split
VALIDATION_SIZE, TEST_SIZE, UNLABELLED_SIZE = 300, 1000, 64
DROP_RATES = (0.5, 0.9, 0.99)
SEEDS = (0, 1, 2)
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)


# --- data and evaluation -------------------------------------------------------------------------------------
def eval_splits(name: str) -> dict:
    task = load_task(name, max_length=MAX_LENGTH)
    return {"validation": task.validation.subset(list(range(VALIDATION_SIZE))),
            "test": task.test.subset(list(range(TEST_SIZE))),
            "unlabelled": task.validation.subset(list(range(VALIDATION_SIZE, VALIDATION_SIZE + UNLABELLED_SIZE))),
            "collate": task.collate}


@torch.no_grad()
def embeddings(backbone, dataset, collate, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled embeddings (in dataset order) and labels; batches sorted by length and trimmed of padding."""
    backbone.eval()
    lengths = torch.stack([dataset[i]["attention_mask"].sum() for i in range(len(dataset))])
    order = torch.argsort(lengths, stable=True)
    pooled = torch.empty(len(dataset), backbone.config.hidden_size)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = collate([dataset[int(i)] for i in index])
        width = int(batch["attention_mask"].sum(dim=1).max())
        ids, mask = batch["input_ids"][:, :width], batch["attention_mask"][:, :width]
        pooled[index] = masked_mean(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        labels[index] = batch["labels"]
    return pooled, labels


def accuracy(backbone, head: dict, split: dict, which: str) -> float:
    pooled, labels = embeddings(backbone, split[which], split["collate"])
    logits = pooled @ head["weight"].T + head["bias"]
    return float((logits.argmax(dim=-1) == labels).float().mean())


# --- stage 1: fine-tunes -------------------------------------------------------------------------------------
def finetune(name: str, work: Path, train_size: int | None = TRAIN_SIZE, label: str | None = None) -> None:
    """Full fine-tuning of MiniLM on one task; saves the backbone and the head as `<label>[.head].safetensors`."""
    from deltatune.recipe import FULL, prepare_model
    from deltatune.train import TrainConfig, Trainer

    label = label or name
    if (work / f"{label}.head.safetensors").exists():
        return
    task = load_task(name, max_length=MAX_LENGTH, train_size=train_size, seed=0)
    model, _ = prepare_model(task, FULL, {}, seed=0)
    config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=0, progress=False, eval_every_epoch=False)
    start = time.perf_counter()
    Trainer(model, config, task.train, None, collate_fn=task.collate).train()
    print(f"fine-tuned {label} in {time.perf_counter() - start:.0f} s", flush=True)
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, work / f"{label}.safetensors")
    save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, work / f"{label}.head.safetensors")


# --- stage 2: DARE vs DAREx-q --------------------------------------------------------------------------------
def pruned(base: dict, finetuned: dict, drop_rate: float, q: float | None, seed: int) -> dict:
    """DARE (q = None, divisor 1 − p) or DAREx-q (divisor q) applied to the one task vector."""
    model_params = [DarexModelParams(density=1.0 - drop_rate, q=q)]
    return merge_state_dicts("darex", base, [finetuned], DarexParams(), model_params, seed=seed)


def prune_experiment(backbone, base: dict, finetuned: dict, head: dict, split: dict) -> list[dict]:
    reference, _ = embeddings(_loaded(backbone, finetuned), split["unlabelled"], split["collate"])

    def test_accuracies(drop_rate, q):
        return [accuracy(_loaded(backbone, pruned(base, finetuned, drop_rate, q, seed)), head, split, "test")
                for seed in SEEDS]

    def labelled(drop_rate):
        return lambda q: accuracy(_loaded(backbone, pruned(base, finetuned, drop_rate, q, 0)), head, split,
                                  "validation")

    def unlabelled(drop_rate):
        def negative_change(q, seed):
            state = pruned(base, finetuned, drop_rate, q, seed)
            return -output_change(reference, embeddings(_loaded(backbone, state), split["unlabelled"],
                                                        split["collate"])[0])
        return seed_averaged(negative_change)

    rows = []
    for drop_rate in DROP_RATES:
        rows.append({"method": "DARE", "p": drop_rate, "q": 1 - drop_rate, "test": test_accuracies(drop_rate, None)})
        for variant, objective in (("DAREx-q (labelled)", labelled), ("DAREx-q (unlabelled)", unlabelled)):
            start = time.perf_counter()
            found = search_rescale_q(objective(drop_rate), lower=1 - drop_rate)
            rows.append({"method": variant, "p": drop_rate, "q": found.best, "search": found.history,
                         "search_seconds": time.perf_counter() - start, "test": test_accuracies(drop_rate, found.best)})
        for row in rows[-3:]:
            print(f"p={drop_rate} {row['method']}: q={row['q']:.3f} test {statistics.mean(row['test']):.4f}",
                  flush=True)
    return rows


# --- stage 3: multi-task merge -------------------------------------------------------------------------------
MERGES = {  # name -> (registered method, params(λ), one model's params(λ)); the papers' defaults otherwise
    "task arithmetic": ("task_arithmetic", lambda lam: TaskArithmeticParams(scaling=lam), lambda lam: None),
    "TIES": ("ties", lambda lam: TiesParams(scaling=lam), lambda lam: TiesModelParams(density=0.2)),
    "DARE-TIES": ("dare_ties", lambda lam: DareTiesParams(scaling=lam), lambda lam: DareModelParams(density=0.1)),
    "PCB": ("pcb", lambda lam: PCBParams(density=0.1, scope="model"), lambda lam: PCBModelParams(weight=lam)),
}


def merged(name: str, base: dict, finetunes: list[dict], lam: float, seed: int = 0) -> dict:
    """Merge method `name` of MERGES at coefficient λ over the fine-tuned state dicts (same params for each)."""
    method, params, model_params = MERGES[name]
    each = model_params(lam)
    per_model = None if each is None else [each] * len(finetunes)
    return merge_state_dicts(method, base, finetunes, params(lam), per_model, seed=seed)


class EvaluationCache:
    """Evaluation results by key, kept in a JSON file, so that a rerun (e.g. on a wider grid) computes only new
    points."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, compute) -> dict:
        if key not in self.values:
            self.values[key] = compute()
            harness.write_json(self.path, self.values)
        return self.values[key]


def per_task(backbone, state: dict, heads: dict, splits: dict, which: str) -> dict[str, float]:
    _loaded(backbone, state)
    return {task: accuracy(backbone, heads[task], splits[task], which) for task in TASKS}


def merge_experiment(backbone, base: dict, finetunes: dict, heads: dict, splits: dict, cache: EvaluationCache
                     ) -> list[dict]:
    states = [finetunes[task] for task in TASKS]

    def evaluate(name: str, lam: float, seed: int, which: str) -> dict[str, float]:
        return cache.get(f"{name}|{lam}|{seed}|{which}", lambda: per_task(
            backbone, merged(name, base, states, lam, seed), heads, splits, which))

    rows = [{"method": "individual fine-tunes", "lambda": None,
             "test": [{task: accuracy(_loaded(backbone, finetunes[task]), heads[task], splits[task], "test")
                       for task in TASKS}]}]
    for name in MERGES:
        tuning = {}
        for lam in LAMBDA_GRID:
            tuning[lam] = statistics.mean(evaluate(name, lam, 0, "validation").values())
        best = max(tuning, key=tuning.get)
        seeds = SEEDS if name.startswith("DARE") else (0,)
        test = [evaluate(name, best, seed, "test") for seed in seeds]
        rows.append({"method": name, "lambda": best, "validation_by_lambda": list(tuning.values()), "test": test})
        print(f"{name}: lambda={best} test mean {statistics.mean(_task_means(test).values()):.4f}", flush=True)
    return rows


def _loaded(backbone, state: dict):
    backbone.load_state_dict(state)
    return backbone


def _task_means(test: list[dict]) -> dict[str, float]:
    return {task: statistics.mean(run[task] for run in test) for task in TASKS}


# --- report --------------------------------------------------------------------------------------------------
def report(payload: dict, command: str) -> str:
    lines = ["# Pruning and merging real MiniLM fine-tunes (WordNet 3.0 tasks)", "",
             f"Measured {payload['merge']['date']} on {payload['merge']['machine']}; pruning "
             f"{payload['prune']['seconds']:.0f} s, merging {payload['merge']['seconds']:.0f} s (fine-tunes included "
             "where they ran).", "",
             f"    {command}", "", "Setup: see the docstring of `benchmarks/merge_wordnet.py`. Accuracies in %.", "",
             f"## DARE vs DAREx-q on the {PRUNE_TASK} fine-tune (whole training split)", "",
             f"Fine-tuned accuracy before pruning: {100 * payload['prune']['finetuned_test']:.1f}; the base "
             f"backbone with the fine-tuned head: {100 * payload['prune']['base_with_head_test']:.1f}.", "",
             f"| drop rate p | method | q (divisor) | test accuracy ({len(SEEDS)} drop seeds) |",
             "| ---: | --- | ---: | ---: |"]
    for row in payload["prune"]["rows"]:
        lines.append(f"| {row['p']} | {row['method']} | {row['q']:.3f} | {mean_std(row['test'])} |")
    lines += ["", "## Multi-task merge of the four task vectors", "",
              "| method | λ (chosen on validation) | " + " | ".join(TASKS) + " | mean |",
              "| --- | ---: | " + " | ".join("---:" for _ in TASKS) + " | ---: |"]
    for row in payload["merge"]["rows"]:
        cells = [mean_std([run[task] for run in row["test"]]) for task in TASKS]
        mean = mean_std([statistics.mean(run.values()) for run in row["test"]])
        lam = "–" if row["lambda"] is None else f"{row['lambda']}"
        lines.append(f"| {row['method']} | {lam} | " + " | ".join(cells) + f" | {mean} |")
    lines += ["", "Validation mean accuracy by λ:", "", "| method | " + " | ".join(map(str, LAMBDA_GRID)) + " |",
              "| --- | " + " | ".join("---:" for _ in LAMBDA_GRID) + " |"]
    for row in payload["merge"]["rows"][1:]:
        values = row["validation_by_lambda"]
        lines.append(f"| {row['method']} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


STAGES = ("prune", "merge")


def run_stage(job: dict, work: Path, threads: int) -> dict:
    """Fine-tune what the stage needs (cached in `work`), run it; the record of the stage."""
    stage = job["stage"]
    started = time.perf_counter()
    backbone = load_minilm_backbone()
    base = {k: v.clone() for k, v in backbone.state_dict().items()}
    env = harness.environment(threads=threads)
    result = {"stage": stage, "date": env["date"][:10], "environment": env,
              "machine": f"{env['cores']} cores, torch {env['torch']}, {threads} thread(s), Python {env['python']}"}
    if stage == "prune":
        label = f"{PRUNE_TASK}-train-all"
        finetune(PRUNE_TASK, work, PRUNE_TRAIN_SIZE, label)
        finetuned, head = (load_file(work / f"{label}{suffix}.safetensors") for suffix in ("", ".head"))
        split = eval_splits(PRUNE_TASK)
        result |= {"finetuned_test": accuracy(_loaded(backbone, finetuned), head, split, "test"),
                   "base_with_head_test": accuracy(_loaded(backbone, base), head, split, "test"),
                   "rows": prune_experiment(backbone, base, finetuned, head, split)}
    else:
        for task in TASKS:
            finetune(task, work)
        finetunes = {task: load_file(work / f"{task}.safetensors") for task in TASKS}
        heads = {task: load_file(work / f"{task}.head.safetensors") for task in TASKS}
        result["rows"] = merge_experiment(backbone, base, finetunes, heads, {t: eval_splits(t) for t in TASKS},
                                          EvaluationCache(work / "evaluations.json"))
    result["seconds"] = time.perf_counter() - started
    return result




def write(output: Path, payload: dict) -> None:
    """The report, atomically, keeping the hand-written notes of the previous one."""
    harness.write_report(output, report(payload, COMMAND))


COMMAND = ("HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_wordnet.py --stage prune & "
           "(same) --stage merge; then --stage report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=(*STAGES, "report", "all"), default="all",
                        help="run one stage (the two can run side by side), write the report, or everything")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-merge-wordnet",
                        help="fine-tunes, evaluation cache and the stages' run log")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/merge_wordnet.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/merge_wordnet.json")
    parser.add_argument("--render", action="store_true", help="only re-write --output from the --json file")
    args = parser.parse_args()
    if args.render:
        write(args.output, json.loads(args.json.read_text()))
        print(args.output.read_text())
        return
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = harness.RunLog(args.work / "stages.jsonl", identity=("stage",))
    stages = {"all": STAGES, "report": ()}.get(args.stage, (args.stage,))
    harness.run_jobs([{"stage": stage} for stage in stages], log, lambda job: run_stage(job, args.work, args.threads))
    done = {record["stage"]: record for record in log.records()}
    missing = [stage for stage in STAGES if stage not in done]
    if missing:
        print(f"stage results kept in {log.path}; the report needs the {' and '.join(missing)} stage too")
        return
    payload = {stage: {k: v for k, v in done[stage].items() if k != "stage"} for stage in STAGES}
    harness.write_json(args.json, payload)
    write(args.output, payload)
    print(args.output.read_text())


if __name__ == "__main__":
    main()

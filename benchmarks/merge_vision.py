"""DARE vs DAREx-q, and multi-task merging, on real full fine-tunes of the shipped vision backbones.

The MiniLM study (`merge_wordnet.py`) could not test two claims: DARE did not collapse at p = 0.99 (its deltas
were small: 250 steps at 5e-5), and the four WordNet tasks interfered too much for any merge to help. Here the
backbones are the pretrained glyph ViT and CNN (`deltatune.data`), fine-tuned fully at the rates small vision
models are trained with in practice (AdamW, 1e-3 for the CNN, 3e-4 for the ViT, warm-up 10% then cosine decay,
batch 64) for EPOCHS epochs, so that every weight moves far from the base.

1. **DARE vs DAREx-q** on each backbone's `glyphs-novel-<b>` fine-tune (classes never seen in pretraining), drop
   rates p = 0.5 / 0.9 / 0.99 / 0.999, three drop seeds; the task vector is every parameter but the head (the
   head is the fine-tune's; BatchNorm running statistics are the fine-tune's, not pruned):
   - DARE: keep 1 − p of the delta entries, rescale by 1/(1 − p);
   - DAREx-q (labelled): one global q in [1 − p, 1] maximising accuracy on the validation subset (drop seed 0);
   - DAREx-q (unlabelled): the same search minimising the mean absolute change of the logits of UNLABELLED_SIZE
     unlabelled validation images, averaged over drop seeds 0–3 with the outlier removed.
2. **Multi-task merge** on the ViT of the three downstream fine-tunes (`handwritten-vit`, `glyphs-novel-vit`,
   `glyphs-rotated-vit`; each keeps its own head): task arithmetic, TIES (density 0.2), DARE-TIES (density 0.1),
   PCB (density 0.1), with the one coefficient λ chosen per method from the same grid on the mean validation
   accuracy; then test accuracy per task. The pieces are `merge_wordnet.py`'s (same methods and defaults).

Fine-tunes are cached in --work. Each stage is one record of `<work>/stages.jsonl` (a re-run skips finished
stages); the raw numbers go to --json, `--render` re-writes the report from it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_vision.py            # every stage, then the report
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_vision.py --render   # the report from the JSON
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

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.data.datasets import model_inputs  # noqa: E402
from deltatune.merging.search.darex_q import output_change, search_rescale_q, seed_averaged  # noqa: E402
from merge_wordnet import MERGES, EvaluationCache, merged, pruned  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("vit", "cnn")
FT_LR = {"vit": 3e-4, "cnn": 1e-3}
EPOCHS, BATCH, WARMUP = 10, 64, 0.1
PRUNE_TASK = "glyphs-novel-{}"
MERGE_TASKS = ("handwritten-vit", "glyphs-novel-vit", "glyphs-rotated-vit")
VALIDATION_SIZE, UNLABELLED_SIZE = 300, 64
DROP_RATES = (0.5, 0.9, 0.99, 0.999)
SEEDS = (0, 1, 2)
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)
COMMAND = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/merge_vision.py"


# --- fine-tunes and the split of a state into task vector / head / buffers ------------------------------------
class TaskModel:
    """One task's model with its splits, and the base state it was fine-tuned from."""

    def __init__(self, name: str) -> None:
        self.task = load_task(name)
        torch.manual_seed(0)
        self.model = self.task.build_model()
        head = tuple(f"{module}." for module in self.task.extra_trainable)
        self.vector_keys = [n for n, _ in self.model.named_parameters() if not n.startswith(head)]
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        validation = self.task.validation
        labelled = min(VALIDATION_SIZE, len(validation) - UNLABELLED_SIZE)  # the two subsets are disjoint
        self.splits = {"validation": validation.subset(range(labelled)),
                       "unlabelled": validation.subset(range(len(validation) - UNLABELLED_SIZE, len(validation))),
                       "test": self.task.test}

    def vector_part(self, state: dict) -> dict:
        return {k: state[k] for k in self.vector_keys}

    def with_vector(self, finetuned: dict, vector_state: dict) -> dict:
        """The fine-tuned state (head, buffers) with its task-vector parameters replaced."""
        return {**finetuned, **vector_state}

    def accuracy(self, state: dict, which: str) -> float:
        self.model.load_state_dict(state)
        return self.task.score(self.model, self.splits[which])

    @torch.no_grad()
    def logits(self, state: dict, which: str) -> torch.Tensor:
        self.model.load_state_dict(state)
        self.model.eval()
        return torch.cat([self.model(**model_inputs(batch)) for batch in self.splits[which].batches(256)])


def finetune(name: str, work: Path) -> dict:
    """Full fine-tuning of the task's pretrained model (cached in `work`): its whole state dict."""
    from deltatune.recipe import FULL, prepare_model
    from deltatune.train import TrainConfig, Trainer

    backbone = name.rsplit("-", 1)[-1]
    path = work / f"{name}-lr{FT_LR[backbone]:g}-e{EPOCHS}.safetensors"
    if not path.exists():
        task = load_task(name)
        model, _ = prepare_model(task, FULL, {}, seed=0)
        config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=FT_LR[backbone], warmup_ratio=WARMUP,
                             schedule="cosine", seed=0, progress=False, eval_every_epoch=False)
        start = time.perf_counter()
        Trainer(model, config, task.train, None, collate_fn=task.collate).train()
        print(f"fine-tuned {name} in {time.perf_counter() - start:.0f} s", flush=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return load_file(path)


# --- stage: DARE vs DAREx-q ------------------------------------------------------------------------------------
def prune_experiment(subject: TaskModel, finetuned: dict) -> list[dict]:
    base, tuned = subject.vector_part(subject.base), subject.vector_part(finetuned)
    reference = subject.logits(finetuned, "unlabelled")

    def state(drop_rate: float, q: float | None, seed: int) -> dict:
        return subject.with_vector(finetuned, pruned(base, tuned, drop_rate, q, seed))

    def test_accuracies(drop_rate: float, q: float | None) -> list[float]:
        return [subject.accuracy(state(drop_rate, q, seed), "test") for seed in SEEDS]

    def labelled(drop_rate: float):
        return lambda q: subject.accuracy(state(drop_rate, q, 0), "validation")

    def unlabelled(drop_rate: float):
        return seed_averaged(lambda q, seed: -output_change(reference, subject.logits(state(drop_rate, q, seed),
                                                                                         "unlabelled")))

    rows = []
    for drop_rate in DROP_RATES:
        rows.append({"method": "DARE", "p": drop_rate, "q": 1 - drop_rate, "test": test_accuracies(drop_rate, None)})
        for variant, objective in (("DAREx-q (labelled)", labelled), ("DAREx-q (unlabelled)", unlabelled)):
            found = search_rescale_q(objective(drop_rate), lower=1 - drop_rate)
            rows.append({"method": variant, "p": drop_rate, "q": found.best, "search": found.history,
                         "test": test_accuracies(drop_rate, found.best)})
        for row in rows[-3:]:
            print(f"p={drop_rate} {row['method']}: q={row['q']:.4f} test {statistics.mean(row['test']):.4f}",
                  flush=True)
    return rows


def prune_stage(backbone: str, work: Path) -> dict:
    name = PRUNE_TASK.format(backbone)
    subject = TaskModel(name)
    finetuned = finetune(name, work)
    base_with_head = subject.with_vector(finetuned, subject.vector_part(subject.base))
    delta = torch.cat([(finetuned[k].float() - subject.base[k].float()).flatten() for k in subject.vector_keys])
    weights = torch.cat([subject.base[k].float().flatten() for k in subject.vector_keys])
    return {"task": name, "finetuned_test": subject.accuracy(finetuned, "test"),
            "base_with_head_test": subject.accuracy(base_with_head, "test"),
            "relative_delta_norm": float(delta.norm() / weights.norm()),
            "rows": prune_experiment(subject, finetuned)}


# --- stage: multi-task merge -----------------------------------------------------------------------------------
def merge_stage(work: Path) -> dict:
    subjects = {name: TaskModel(name) for name in MERGE_TASKS}
    finetunes = {name: finetune(name, work) for name in MERGE_TASKS}
    first = subjects[MERGE_TASKS[0]]
    base = first.vector_part(first.base)
    vectors = [subjects[name].vector_part(finetunes[name]) for name in MERGE_TASKS]
    cache = EvaluationCache(work / "evaluations.json")

    def per_task(state: dict, which: str) -> dict[str, float]:
        return {name: subjects[name].accuracy(subjects[name].with_vector(finetunes[name], state), which)
                for name in MERGE_TASKS}

    def evaluate(method: str, lam: float, seed: int, which: str) -> dict[str, float]:
        return cache.get(f"{method}|{lam}|{seed}|{which}",
                         lambda: per_task(merged(method, base, vectors, lam, seed), which))

    rows = [{"method": "individual fine-tunes", "lambda": None,
             "test": [{name: subjects[name].accuracy(finetunes[name], "test") for name in MERGE_TASKS}]},
            {"method": "base backbone, fine-tuned heads", "lambda": None, "test": [per_task(base, "test")]}]
    for method in MERGES:
        tuning = {lam: statistics.mean(evaluate(method, lam, 0, "validation").values()) for lam in LAMBDA_GRID}
        best = max(tuning, key=tuning.get)
        seeds = SEEDS if method.startswith("DARE") else (0,)
        rows.append({"method": method, "lambda": best, "validation_by_lambda": list(tuning.values()),
                     "test": [evaluate(method, best, seed, "test") for seed in seeds]})
        print(f"{method}: lambda={best} test {rows[-1]['test'][0]}", flush=True)
    return {"rows": rows}


# --- report ----------------------------------------------------------------------------------------------------
def _prune_table(record: dict) -> list[str]:
    lines = [f"### {record['task']}", "",
             f"Fine-tuned test accuracy {100 * record['finetuned_test']:.1f}%; the base backbone with the fine-tuned "
             f"head: {100 * record['base_with_head_test']:.1f}%; ‖Δ‖/‖W₀‖ = {record['relative_delta_norm']:.3f}.", "",
             f"| drop rate p | method | q (divisor) | test accuracy ({len(SEEDS)} drop seeds) |",
             "| ---: | --- | ---: | ---: |"]
    lines += [f"| {r['p']} | {r['method']} | {r['q']:.4f} | {mean_std(r['test'])} |" for r in record["rows"]]
    return lines + [""]


def _merge_table(record: dict) -> list[str]:
    lines = ["| method | λ (chosen on validation) | " + " | ".join(MERGE_TASKS) + " | mean |",
             "| --- | ---: | " + " | ".join("---:" for _ in MERGE_TASKS) + " | ---: |"]
    for row in record["rows"]:
        cells = [mean_std([run[name] for run in row["test"]]) for name in MERGE_TASKS]
        mean = mean_std([statistics.mean(run.values()) for run in row["test"]])
        lam = "–" if row["lambda"] is None else f"{row['lambda']}"
        lines.append(f"| {row['method']} | {lam} | " + " | ".join(cells) + f" | {mean} |")
    lines += ["", "Validation mean accuracy by λ:", "", "| method | " + " | ".join(map(str, LAMBDA_GRID)) + " |",
              "| --- | " + " | ".join("---:" for _ in LAMBDA_GRID) + " |"]
    for row in record["rows"]:
        if "validation_by_lambda" in row:
            lines.append(f"| {row['method']} | " + " | ".join(f"{100 * v:.1f}" for v in row["validation_by_lambda"])
                         + " |")
    return lines + [""]


def report(payload: dict) -> str:
    env = payload.get("environment", {})
    lines = ["# DARE vs DAREx-q and multi-task merging on the vision backbones", "",
             f"Measured {harness.environment_line(env) if env else '?'}; seconds per "
             "stage: " + ", ".join(f"{s} {payload[s]['seconds']:.0f}" for s in payload if s != "environment"), "",
             f"    {COMMAND}", "",
             f"Setup: see the docstring of `benchmarks/merge_vision.py` (full fine-tunes, {EPOCHS} epochs, batch "
             f"{BATCH}, AdamW at {FT_LR}, warm-up {WARMUP:.0%} + cosine). Accuracies in %.", "",
             "## DARE vs DAREx-q", ""]
    for backbone in BACKBONES:
        if f"prune-{backbone}" in payload:
            lines += _prune_table(payload[f"prune-{backbone}"])
    if "merge-vit" in payload:
        lines += ["## Multi-task merge of three ViT task vectors", "", *_merge_table(payload["merge-vit"])]
    return "\n".join(lines) + "\n"




def write(output: Path, payload: dict) -> None:
    harness.write_report(output, report(payload))


def run_stage(job: dict, work: Path) -> dict:
    started = time.perf_counter()
    stage = job["stage"]
    result = prune_stage(stage.split("-")[1], work) if stage.startswith("prune") else merge_stage(work)
    return {"stage": stage, **result, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="*", default=[*(f"prune-{b}" for b in BACKBONES), "merge-vit"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-merge-vision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/merge_vision.md")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/merge_vision.json")
    parser.add_argument("--render", action="store_true", help="only re-write --output from the --json file")
    args = parser.parse_args()
    if not args.render:
        torch.set_num_threads(args.threads)
        args.work.mkdir(parents=True, exist_ok=True)
        log = harness.RunLog(args.work / "stages.jsonl", identity=("stage",))
        harness.run_jobs([{"stage": s} for s in args.stages], log, lambda job: run_stage(job, args.work))
        payload = {r["stage"]: r for r in log.records()}
        payload["environment"] = harness.environment(threads=args.threads, command=COMMAND)
        harness.write_json(args.json, payload)
    write(args.output, json.loads(args.json.read_text()))
    print(args.output.read_text())


if __name__ == "__main__":
    main()

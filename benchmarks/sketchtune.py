"""SketchTune at small scale on WordNet-LM: the sketch's memory, the GPR sweep, and SketchTune vs LoRA.

Model: the shipped WordNet-LM (Llama architecture, 5 blocks, hidden 256, MLP 688; float32 in memory). Every Linear
of the blocks (q, k, v, o, gate, up, down: 35 layers, 3,624,960 weights) is sketched / LoRA-adapted
(`targets="all-linear"`; the tied head and the embeddings stay dense, as in the paper). The sketch is OUR
substitute for the unreleased sketching step: per-(row, group) 1-D k-means, 16 levels (4 bits), 10 Lloyd steps,
plain or activation-weighted (diag(XᵀX) of 64 calibration lines: held-out *train* synsets).

(a) memory: bytes of the linear weights and of the whole model, dense (float32 and bf16) vs sketched (packed
    codes + tables, tables in float32 as trained here and in bf16 as the paper ships them), from tensor sizes.
(b) GPR sweep 1, 2, 4, 8 at 4 bits: before tuning, the held-out line loss (`heldout_loss`, the 250 held-out
    *test* synsets' lines, nats/token) and the gloss-generation test loss; after fine-tuning, the test loss.
(c) fine-tune task: gloss-generation (lemma -> definition; loss on the definition tokens), SketchTune GPR 1 / 4
    vs LoRA r = 8 / 33 at equal trainable counts (184,960 vs 192,000 and 762,960 vs 768,000), 3 seeds.
Recipe: AdamW, weight decay 0 (the paper's), batch 16, 40 steps, 10% warm-up then linear decay (the paper's
shape), grad-clip 1.0. lr per configuration: the best validation loss (250 validation items) of LR_GRID
(3e-5 … 1e-2) with seed 0, then seeds 1 and 2 at that lr. Reported: test loss (250 test items), mean ± std over
seeds 0, 1, 2.

    flock /work/wt/heavy.lock env PYTHONPATH=src /work/main/.venv/bin/python benchmarks/sketchtune.py \
        > /tmp/sketchtune_bench.log 2>&1
Resumable: finished runs are kept in benchmarks/results/sketchtune.jsonl; re-running skips them.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.bench import harness  # noqa: E402
from deltatune.data import load_task  # noqa: E402
from deltatune.data.wordnet_lm import encode_row_lines, heldout_loss, load_wordnet_lm, read_heldout_rows  # noqa: E402
from deltatune.methods.sketchtune import sketch_bytes, sketch_deltas, sketch_with_activations  # noqa: E402
from deltatune.train import TrainConfig, Trainer  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOG = Path(os.environ.get("SKETCHTUNE_LOG", RESULTS / "sketchtune.jsonl"))
GPRS = (1, 2, 4, 8)
CONFIGS = {f"SketchTune GPR={g}": ("sketchtune", {"groups_per_row": g}) for g in GPRS}
CONFIGS |= {"LoRA r=8": ("lora", {"rank": 8}), "LoRA r=33": ("lora", {"rank": 33})}
PAIRS = (("SketchTune GPR=1", "LoRA r=8"), ("SketchTune GPR=4", "LoRA r=33"))
LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # extended below 3e-4: SketchTune chose the old edge
SEEDS = (0, 1, 2)
STEPS, BATCH = int(os.environ.get("SKETCHTUNE_STEPS", "40")), 16
CALIBRATION_LINES = 64
IDENTITY = ("part", "label", "weighting", "lr", "seed")


class Context:
    """The dense LM, the task, and the sketched models built so far (the sketch is deterministic: built once)."""

    def __init__(self) -> None:
        self.model, self.tokenizer = load_wordnet_lm()
        self.task = load_task("gloss-generation")
        rows = read_heldout_rows()
        self.test_rows = [row for row in rows if row["split"] == "test"]
        self.calibration_rows = [row for row in rows if row["split"] == "train"][:CALIBRATION_LINES]
        self._sketched: dict[tuple[int, str], torch.nn.Module] = {}

    def sketched(self, groups: int, weighting: str = "plain") -> torch.nn.Module:
        if (groups, weighting) not in self._sketched:
            model = dt.adapt(copy.deepcopy(self.model), dt.SketchTuneConfig(groups_per_row=groups))
            if weighting == "activations":
                sketch_with_activations(model, self.calibration_batches())
            self._sketched[groups, weighting] = model
        return self._sketched[groups, weighting]

    def calibration_batches(self) -> list[dict]:
        encoded = encode_row_lines(self.tokenizer, self.calibration_rows)
        batches = []
        for start in range(0, len(encoded), 16):
            chunk = encoded[start:start + 16]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(chunk):
                ids[row, :len(tokens)], mask[row, :len(tokens)] = torch.tensor(tokens), 1
            batches.append({"input_ids": ids, "attention_mask": mask})
        return batches


def answer_loss(model: torch.nn.Module, dataset, collate, batch_size: int = 64) -> float:
    """Token-mean cross-entropy (nats) on the definition tokens (labels != -100), the model's shift."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), targets,
                                                             ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


def memory_of(model: torch.nn.Module) -> dict:
    """Bytes of the sketched linears (codes, tables), their dense weights, and everything else in the model."""
    deltas = sketch_deltas(model)
    linear_weights = sum(host.base_layer.weight.numel() for _, host, _ in deltas)
    table_numbers = sum(delta.sketch_table.numel() for _, _, delta in deltas)
    code_bytes = sum(delta.sketch_codes.numel() for _, _, delta in deltas)
    base = [p for n, p in model.named_parameters() if ".deltas." not in f".{n}"]
    everything = sum(p.numel() for p in {id(p): p for p in base}.values())
    return {"linear_weights": linear_weights, "table_numbers": table_numbers, "code_bytes": code_bytes,
            "sketch_bytes_fp32_tables": sketch_bytes(model), "other_numbers": everything - linear_weights}


def reconstruction_seconds(model: torch.nn.Module) -> float:
    """Median wall time of rebuilding every sketched weight once (the per-step overhead in training)."""
    deltas = [delta for _, _, delta in sketch_deltas(model)]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for delta in deltas:
            delta.sketched_weight()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_sketch(context: Context, job: dict) -> dict:
    """Part (a)/(b): a sketch before any tuning (or the dense LM)."""
    task = context.task
    if job["label"] == "dense":
        model = context.model
        record = {}
    else:
        model = context.sketched(int(job["label"].split("=")[1]), job["weighting"])
        errors = [delta.reconstruction_error(host.base_layer.weight) for _, host, delta in sketch_deltas(model)]
        record = {"reconstruction_error": statistics.fmean(errors), **memory_of(model),
                  "rebuild_seconds": reconstruction_seconds(model)}
    record |= {"heldout_line_loss": heldout_loss(model, context.tokenizer, context.test_rows),
               "test_loss": answer_loss(model, task.test, task.collate)}
    return {**job, **record}


def run_finetune(context: Context, job: dict) -> dict:
    """Part (b)/(c): one fine-tune of the gloss-generation task."""
    method, params = CONFIGS[job["label"]]
    if method == "sketchtune":
        model = copy.deepcopy(context.sketched(params["groups_per_row"]))
    else:
        torch.manual_seed(job["seed"])  # LoRA's A
        model = dt.adapt(copy.deepcopy(context.model), dt.config_for(method, targets="all-linear", **params))
    timer = harness.StepTimer()
    settings = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=job["lr"], warmup_ratio=0.1, seed=job["seed"],
                           progress=False, eval_every_epoch=False, log_every=5)
    task = context.task
    result = Trainer(model, settings, task.train, None, collate_fn=task.collate, callbacks=[timer]).train()
    losses = [record["loss"] for record in result.history if "loss" in record]
    return {**job, "trainable": dt.trainable_parameters(model).trainable,
            "validation_loss": answer_loss(model, task.validation, task.collate),
            "test_loss": answer_loss(model, task.test, task.collate), "final_train_loss": losses[-1],
            "median_step_seconds": statistics.median(timer.seconds[2:] or timer.seconds)}


def run(context: Context, job: dict) -> dict:
    return run_sketch(context, job) if job["part"] == "sketch" else run_finetune(context, job)


def sketch_jobs() -> list[dict]:
    jobs = [{"part": "sketch", "label": "dense", "weighting": "none", "lr": 0, "seed": 0}]
    return jobs + [{"part": "sketch", "label": f"GPR={g}", "weighting": w, "lr": 0, "seed": 0}
                   for g in GPRS for w in ("plain", "activations")]


def finetune_job(label: str, lr: float, seed: int) -> dict:
    return {"part": "finetune", "label": label, "weighting": "plain", "lr": lr, "seed": seed}


def chosen_lrs(records: list[dict]) -> dict[str, float]:
    """Per configuration, the grid rate with the lowest seed-0 validation loss (among the rates run so far: a
    partial grid is flagged by `complete`)."""
    chosen = {}
    for label in CONFIGS:
        rows = [r for r in records if r["part"] == "finetune" and r["label"] == label and r["seed"] == 0
                and r["lr"] in LR_GRID]
        if rows:
            chosen[label] = min(rows, key=lambda r: r["validation_loss"])["lr"]
    return chosen


def main() -> None:
    torch.set_num_threads(2)
    log = harness.RunLog(LOG, IDENTITY)
    context = Context()

    def execute(job: dict) -> dict:
        return run(context, job)

    def describe(job: dict) -> str:
        return f"{job['part']} {job['label']} {job['weighting']} lr={job['lr']} seed={job['seed']}"

    harness.run_jobs(sketch_jobs(), log, execute, describe=describe)
    write(log.records())
    # the equal-count pairs first (part c), then the rest of the sweep: a run cut short still answers (c)
    paired = [label for pair in PAIRS for label in pair]
    for labels in (paired, [label for label in CONFIGS if label not in paired]):
        tuning = [finetune_job(label, lr, 0) for label in labels for lr in LR_GRID]
        harness.run_jobs(tuning, log, execute, describe=describe)
        chosen = chosen_lrs(log.records())
        seeds = [finetune_job(label, chosen[label], seed) for label in labels for seed in SEEDS[1:]]
        harness.run_jobs(seeds, log, execute, describe=describe)
        write(log.records())


# --- the report ---------------------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f} (1 seed)" if values else "–"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def memory_table(records: list[dict]) -> list[str]:
    sketches = {r["label"]: r for r in records if r["part"] == "sketch" and r["weighting"] == "plain"}
    if not sketches:
        return []
    first = next(iter(sketches.values()))
    linear, other = first["linear_weights"], first["other_numbers"]
    lines = ["| base | linear weights (MB) | whole model (MB) | linear vs dense fp32 | linear vs dense bf16 |",
             "|---|---|---|---|---|",
             f"| dense fp32 | {4 * linear / 1e6:.2f} | {4 * (linear + other) / 1e6:.2f} | 1.00x | 2.00x |",
             f"| dense bf16 | {2 * linear / 1e6:.2f} | {2 * (linear + other) / 1e6:.2f} | 0.50x | 1.00x |"]
    for label, r in sketches.items():
        for dtype, size in (("fp32", 4), ("bf16", 2)):
            sketch = r["code_bytes"] + size * r["table_numbers"]
            whole = sketch + size * other
            lines.append(f"| sketch {label}, {dtype} tables | {sketch / 1e6:.2f} | {whole / 1e6:.2f} | "
                         f"{sketch / (4 * linear):.3f}x | {sketch / (2 * linear):.3f}x |")
    return lines


def sweep_table(records: list[dict], chosen: dict[str, float]) -> list[str]:
    sketches = {(r["label"], r["weighting"]): r for r in records if r["part"] == "sketch"}
    lines = ["| GPR | trainable | rel. ‖W − W̃‖ (plain / act.) | held-out line loss (plain / act.) | "
             "test loss before tuning (plain) | lr | test loss after tuning |", "|---|---|---|---|---|---|---|"]
    if ("dense", "none") in sketches:
        dense = sketches["dense", "none"]
        lines.append(f"| dense base | – | 0 | {dense['heldout_line_loss']:.4f} | {dense['test_loss']:.4f} | – | – |")
    for g in GPRS:
        plain, weighted = sketches.get((f"GPR={g}", "plain")), sketches.get((f"GPR={g}", "activations"))
        if plain is None or weighted is None:
            continue
        label = f"SketchTune GPR={g}"
        tuned = _seed_losses(records, label, chosen.get(label))
        lines.append(f"| {g} | {plain['table_numbers']:,} | {plain['reconstruction_error']:.4f} / "
                     f"{weighted['reconstruction_error']:.4f} | {plain['heldout_line_loss']:.4f} / "
                     f"{weighted['heldout_line_loss']:.4f} | {plain['test_loss']:.4f} | {chosen.get(label, '–')} | "
                     f"{_mean_std(tuned)} |")
    return lines


def _seed_losses(records: list[dict], label: str, lr: float | None, key: str = "test_loss") -> list[float]:
    return [r[key] for r in records if r["part"] == "finetune" and r["label"] == label and r["lr"] == lr]


def versus_table(records: list[dict], chosen: dict[str, float]) -> list[str]:
    lines = ["| configuration | trainable | lr (edge of grid?) | validation loss | test loss | median step s |",
             "|---|---|---|---|---|---|"]
    for label in CONFIGS:
        rows = [r for r in records if r["part"] == "finetune" and r["label"] == label and r["lr"] == chosen.get(label)]
        if not rows:
            continue
        edge = " (edge)" if chosen[label] in (LR_GRID[0], LR_GRID[-1]) else ""
        lines.append(f"| {label} | {rows[0]['trainable']:,} | {chosen[label]:g}{edge} | "
                     f"{_mean_std([r['validation_loss'] for r in rows])} | {_mean_std([r['test_loss'] for r in rows])} "
                     f"| {statistics.median(r['median_step_seconds'] for r in rows):.3f} |")
    return lines


def grid_table(records: list[dict]) -> list[str]:
    header = "| configuration | " + " | ".join(f"lr {lr:g}" for lr in LR_GRID) + " |"
    lines = [header, "|---" * (len(LR_GRID) + 1) + "|"]
    for label in CONFIGS:
        cells = []
        for lr in LR_GRID:
            row = [r for r in records if r["part"] == "finetune" and r["label"] == label and r["lr"] == lr
                   and r["seed"] == 0]
            cells.append(f"{row[0]['validation_loss']:.4f}" if row else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def rebuild_line(records: list[dict]) -> list[str]:
    """The per-step cost of the gather: rebuilding every sketched weight, against a SketchTune training step."""
    rebuilds = [r["rebuild_seconds"] for r in records if r["part"] == "sketch" and "rebuild_seconds" in r]
    steps = [r["median_step_seconds"] for r in records if r["part"] == "finetune" and "SketchTune" in r["label"]]
    if not rebuilds or not steps:
        return []
    rebuild, step = statistics.median(rebuilds), statistics.median(steps)
    return [f"Rebuilding all 35 sketched weights from codes + tables (one gather each, every training step): "
            f"{1000 * rebuild:.0f} ms (median over GPRs), {100 * rebuild / step:.0f}% of the median SketchTune "
            f"training step ({step:.2f} s), so training rebuilds them every step and no cache is needed "
            "(`cache_weight=True` keeps them between no-grad calls).", ""]


def complete(records: list[dict], chosen: dict[str, float]) -> bool:
    runs = {(r["label"], r["lr"], r["seed"]) for r in records if r["part"] == "finetune"}
    grid = all((label, lr, 0) in runs for label in CONFIGS for lr in LR_GRID)
    seeds = all((label, lr, seed) in runs for label, lr in chosen.items() for seed in SEEDS)
    return grid and seeds and len(chosen) == len(CONFIGS)


def write(records: list[dict]) -> None:
    chosen = chosen_lrs(records)
    env = harness.environment(threads=2)
    status = "" if complete(records, chosen) else \
        "\n**PARTIAL**: not every run finished; resume with the command above (finished runs are kept).\n"
    text = ["# SketchTune on WordNet-LM: sketch memory, GPR sweep, vs LoRA at equal trainable counts", "",
            harness.environment_line(env), "", __doc__.strip(), "", status,
            "## (a) Memory of the sketched base (from tensor sizes)", "", *memory_table(records), "",
            *rebuild_line(records), "## (b) GPR sweep (4 bits)", "", *sweep_table(records, chosen), "",
            "## (c) SketchTune vs LoRA on gloss-generation (all block linears)", "", *versus_table(records, chosen),
            "", "## Validation loss of every rate (seed 0)", "", *grid_table(records), "",
            f"Raw runs: {LOG.name} ({len(records)} records).", ""]
    report = RESULTS / "sketchtune.md"
    harness.write_report(report, "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    if sys.argv[1:] == ["--report"]:
        write(harness.RunLog(LOG, IDENTITY).records())
    else:
        main()

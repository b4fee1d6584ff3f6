"""Step time, training memory and merged inference of the reparameterization family, as ratios, in one run.

Contenders on two real backbones (GlyphViT on glyphs-novel-vit, MiniLM on wordnet-nouns), each at its library
defaults (trainable counts reported, not matched: this table is about cost; matched-count accuracy is in the
leaderboard, loldu_rank_sweep.md, flora_conv.md, tlora_ablation.md and sketchtune.md): LoRA (reference), DoRA,
PiSSA, OLoRA, LoLDU, FLoRA, transformed LoRA (TLoRA), LoHa, LoKr and SketchTune.

Training step and memory: measured as in additive_cost.py (whole steps alternated A B C ... on one batch, median
per round, ratio to LoRA's in the same round; memory = what autograd saves for backward + gradients + AdamW's
two moments of the trainable parameters).

Inference: each mergeable contender's trainable tensors are first moved off their initial values (seeded noise,
so the merged weights differ from the base), then the base model (the adapters removed), the merged-and-unloaded
model and the unmerged adapted model run eval-mode forwards alternated on the same batch; medians, ratios to the
base in the same round. Merged and unmerged outputs are compared (max |difference|, float32). SketchTune's sketch
replaces the base weight: its merge writes the decoded sketch as a dense weight, and the base it is timed against
is the dense pretrained model.

    flock /work/wt/heavy.lock python benchmarks/reparam_cost.py          # a few minutes on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from additive_cost import BATCH, MAX_LENGTH, ROUNDS, STEPS, WARMUP, contender, memory_mib, train_step  # noqa: E402
from deltatune.bench import harness  # noqa: E402

METHODS = ("lora", "dora", "pissa", "olora", "loldu", "flora", "tlora", "loha", "lokr", "sketchtune")
TASKS = ("glyphs-novel-vit", "wordnet-nouns")
INFERENCE_REPEATS = 10


def perturbed(model, seed: int = 0):
    """The adapted model with every trainable tensor moved by seeded noise (a trained-looking update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(0.01 * noise)
    return model


def forward(model, batch: dict):
    from deltatune.data.datasets import model_inputs

    with torch.no_grad():
        return model(**model_inputs(batch))


def inference_row(model, batch: dict) -> dict:
    """Base vs merged vs unmerged eval forwards, alternated; None entries where a model cannot be built."""
    import deltatune as dt
    from deltatune.errors import DeltatuneError

    adapted = perturbed(copy.deepcopy(model)).eval()
    base = dt.unload(copy.deepcopy(adapted), merge=False).eval()
    try:
        merged = dt.unload(copy.deepcopy(adapted), merge=True).eval()
    except DeltatuneError as refusal:
        merged, why = None, str(refusal).split(";")[0]
    else:
        why = ""
    runs = {"base": base, "unmerged": adapted, **({"merged": merged} if merged is not None else {})}
    rounds = []
    for _ in range(ROUNDS):
        seconds = {label: [] for label in runs}
        for _ in range(WARMUP + INFERENCE_REPEATS):
            for label, net in runs.items():
                start = time.perf_counter()
                forward(net, batch)
                seconds[label].append(time.perf_counter() - start)
        rounds.append({label: statistics.median(s[WARMUP:]) for label, s in seconds.items()})
    row = {"unmerged_ratio": [r["unmerged"] / r["base"] for r in rounds], "not_mergeable": why}
    if merged is not None:
        row["merged_ratio"] = [r["merged"] / r["base"] for r in rounds]
        row["merge_max_abs_gap"] = float((forward(merged, batch) - forward(adapted, batch)).abs().max())
    return row


def measure(task_name: str) -> list[dict]:
    from deltatune.data import load_task

    task = load_task(task_name, max_length=MAX_LENGTH)
    batch = task.collate([task.train[i] for i in range(BATCH)])
    built = {method: contender(task, method, {}) for method in METHODS}
    rounds = []
    for _ in range(ROUNDS):
        timers = {method: harness.StepTimer() for method in built}
        for _ in range(WARMUP + STEPS):
            for method, (model, optimizer, _) in built.items():
                timers[method].on_step_begin()
                train_step(model, optimizer, batch)
                timers[method].on_step_end()
        rounds.append({method: statistics.median(t.seconds[WARMUP:]) for method, t in timers.items()})
    memory = {method: memory_mib(model, trainable, batch) for method, (model, _, trainable) in built.items()}
    return [{"task": task_name, "method": method, "trainable": sum(p.numel() for p in built[method][2]),
             "step_seconds": [r[method] for r in rounds], "time_ratio": [r[method] / r["lora"] for r in rounds],
             "memory_mib": memory[method], "memory_ratio": memory[method] / memory["lora"],
             **inference_row(built[method][0], batch)} for method in built]


def _ratios(values: list[float] | None) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "–"


def render(rows: list[dict], env: dict) -> str:
    lines = ["# Reparameterizations: step time, training memory and merged inference as ratios (one run)", "",
             harness.environment_line(env), "", "Command: `python benchmarks/reparam_cost.py`", "",
             " ".join((__doc__ or "").split("\n\n")[1:4]).replace("\n", " "), "",
             "| task | method | trainable (with head) | step time ×LoRA (per round) | memory (MiB) | memory ×LoRA | "
             "merged inference ×base (per round) | unmerged inference ×base | merged vs unmerged max abs |",
             "|---|---|---:|---|---:|---:|---|---|---:|"]
    for row in rows:
        merged = f"not mergeable: {row['not_mergeable']}" if row["not_mergeable"] else _ratios(row.get("merged_ratio"))
        gap = f"{row['merge_max_abs_gap']:.1e}" if "merge_max_abs_gap" in row else "–"
        lines.append(f"| {row['task']} | {row['method']} | {row['trainable']:,} | {_ratios(row['time_ratio'])} | "
                     f"{row['memory_mib']:.1f} | {row['memory_ratio']:.2f} | {merged} | "
                     f"{_ratios(row['unmerged_ratio'])} | {gap} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/reparam_cost")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for task_name in args.tasks for row in measure(task_name)]
    harness.write_json(f"{args.output}.json", rows)
    harness.write_report(Path(f"{args.output}.md"), render(rows, harness.environment(threads=args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SaRA in its own setting: adapting the pretrained glyph DDPM to handwritten digits, SaRA vs LoRA vs full.

SaRA's claim (Hu et al., ICLR 2025): fine-tuning a diffusion model through its smallest-magnitude weights, at the
trainable count of a LoRA, adapts as well as LoRA while keeping more of the base model's own generation, at less
training memory. Task `diffusion-handwritten` (`deltatune.data`): the glyph DDPM (diffusers UNet2DModel,
62 glyph classes, pretrained here) learns to draw scikit-learn's handwritten digits, conditioned on the digit's
glyph class id.

Per method and seed, one child process (so peak memory is the run's own) trains the model `deltatune train` builds
(`recipe.prepare_model`) with the deltatune Trainer: AdamW, batch 32, EPOCHS epochs of the 1,259 training digits,
linear decay; LoRA rank RANK (alpha = rank) on each method's default UNet layers; SaRA's `fraction` set by
`deltatune.bench.budget.match_budget` so that it trains as many numbers as that LoRA; full fine-tuning trains the
whole UNet. Learning rates: LR (one per method, the rates each family is trained with on diffusion models: 1e-4 for
full fine-tuning, 1e-3 for LoRA and SaRA; not tuned here, said so in the report).
Measured:
- target quality: FD-CNN of 500 generated digits (DPM-Solver++ 10 steps, noise seed 0) vs the real test digits
  (the task's metric, lower is better), and the frozen digit judge's accuracy on them;
- base-domain keeping: FD-CNN of glyphs generated for 10 test-font glyphs of each of the 62 classes vs those
  real glyphs, and the GlyphCNN's accuracy on them, against the base DDPM's (what SaRA claims to protect);
- the training's median step time and peak RSS, as ratios to LoRA at the same seed (runs of a seed are
  consecutive, so they share the machine's state).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sara_diffusion.py            # runs (resumable), then the report
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sara_diffusion.py --render   # the report from the JSONL
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "diffusion-handwritten"
METHODS = ("lora", "sara", "full")
RANK, EPOCHS, BATCH = 8, 3, 32
LR = {"lora": 1e-3, "sara": 1e-3, "full": 1e-4}
SEEDS = (0, 1, 2)
GLYPHS_PER_CLASS = 10  # base-domain glyphs per class (620 samples)
COMMAND = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sara_diffusion.py"


def median_step(timer: harness.StepTimer) -> float:
    """The median step time, the first two (warm-up) steps left out."""
    return statistics.median(timer.seconds[2:] or timer.seconds)


def method_params(method: str) -> dict[str, Any]:
    """LoRA at RANK; SaRA at LoRA's trainable count; full: none."""
    if method == "lora":
        return {"rank": RANK, "alpha": RANK}
    if method == "full":
        return {}
    from deltatune.bench.budget import match_budget, task_counter
    from deltatune.data import load_task

    task = load_task(TASK)
    target = task_counter(task, "lora", batch_size=BATCH)({"rank": RANK, "alpha": RANK})
    return match_budget(method, target, task_counter(task, method, batch_size=BATCH)).params()


def glyph_subset(per_class: int = GLYPHS_PER_CLASS):
    """The first `per_class` test-font glyphs of every class (the base domain, kept small for time)."""
    import torch

    from deltatune.data.diffusion_eval import glyph_test_set

    pixels, labels = glyph_test_set()
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()])
    return pixels[keep], labels[keep]


def measure(model) -> dict:
    """Target (digits) and base-domain (glyphs) generation quality of a DDPM."""
    from deltatune.data import load_task
    from deltatune.data.diffusion_eval import generation_report, load_digit_judge, load_feature_network

    test = load_task(TASK).test.tensors
    digits = generation_report(model, test["pixels"], test["labels"], judge=load_digit_judge())
    network = load_feature_network()
    pixels, labels = glyph_subset()
    glyphs = generation_report(model, pixels, labels, judge=network, feature_network=network,
                               min_samples=len(labels))
    return {"test_fd": digits["fd_cnn"], "judge_accuracy": digits["judge_accuracy"], "glyphs": glyphs}


def run(job: dict) -> dict:
    """One fine-tune (in this process) and its measurements."""
    import torch

    from deltatune.data import load_task
    from deltatune.recipe import prepare_model
    from deltatune.train import TrainConfig, Trainer

    torch.set_num_threads(job["threads"])
    params = method_params(job["method"])
    task = load_task(TASK)
    model, config = prepare_model(task, job["method"], params, seed=job["seed"], batch_size=BATCH)
    steps = EPOCHS * -(-len(task.train) // BATCH)
    timer = harness.StepTimer()
    callbacks = (*(config.training_callbacks(model, steps) if config is not None else ()), timer)
    settings = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR[job["method"]], seed=job["seed"], progress=False,
                           eval_every_epoch=False)
    start = time.perf_counter()
    Trainer(model, settings, task.train, None, collate_fn=task.collate, callbacks=callbacks).train()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**job, "params": params, "trainable": trainable, **measure(model), "step_seconds": median_step(timer),
            "train_seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def base_record(threads: int) -> dict:
    import torch

    from deltatune.data import load_task

    torch.set_num_threads(threads)
    return {"method": "base", "seed": 0, **measure(load_task(TASK).build_model())}


# --- report ----------------------------------------------------------------------------------------------------
def _ratio(records: list[dict], method: str, key: str) -> str:
    ratios = []
    for seed in SEEDS:
        mine = [r for r in records if r["method"] == method and r["seed"] == seed]
        lora = [r for r in records if r["method"] == "lora" and r["seed"] == seed]
        if mine and lora:
            ratios.append(mine[0][key] / lora[0][key])
    return f"{statistics.mean(ratios):.2f}x" if ratios else "–"


def report(records: list[dict]) -> str:
    base = next((r for r in records if r["method"] == "base"), None)
    env = next((r["environment"] for r in records if "environment" in r), {})
    lines = ["# SaRA vs LoRA vs full fine-tuning on the glyph DDPM (adapting to handwritten digits)", "",
             f"{harness.environment_line(env) if env else ''}", "", f"    {COMMAND}", "",
             f"Setup: see the docstring of `benchmarks/sara_diffusion.py` ({EPOCHS} epochs of 1,259 digits = "
             f"{EPOCHS * -(-1259 // BATCH)} steps, batch {BATCH}, LoRA rank {RANK}, SaRA at LoRA's count, rates "
             f"{LR} not tuned). FD-CNN: lower is better; accuracies in %; mean ± std over seeds {list(SEEDS)}.", ""]
    if base:
        lines += [f"Base DDPM (no adaptation): digits FD-CNN {base['test_fd']:.2f}, digit-judge accuracy "
                  f"{100 * base['judge_accuracy']:.1f}%; glyphs FD-CNN {base['glyphs']['fd_cnn']:.2f}, GlyphCNN "
                  f"accuracy {100 * base['glyphs']['judge_accuracy']:.1f}%.", ""]
    lines += ["| method | trainable | digits FD-CNN ↓ | digit-judge acc. | glyphs FD-CNN ↓ (base domain) | "
              "glyph acc. (base domain) | step time vs LoRA | peak RSS vs LoRA |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        rows = [r for r in records if r["method"] == method]
        if not rows:
            continue
        lines.append(
            f"| {method} | {rows[0]['trainable']:,} | {mean_std([r['test_fd'] for r in rows], scale=1, digits=2)} | "
            f"{mean_std([r['judge_accuracy'] for r in rows])} | "
            f"{mean_std([r['glyphs']['fd_cnn'] for r in rows], scale=1, digits=2)} | "
            f"{mean_std([r['glyphs']['judge_accuracy'] for r in rows])} | {_ratio(records, method, 'step_seconds')} | "
            f"{_ratio(records, method, 'peak_rss_mb')} |")
    return "\n".join(lines) + "\n"




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", type=Path, default=ROOT / "benchmarks/results/sara_diffusion.jsonl")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/sara_diffusion.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        job = json.loads(args.run)
        harness.emit(base_record(job["threads"]) if job["method"] == "base" else run(job))
        return
    log = harness.RunLog(args.jsonl, identity=("method", "seed"))
    if not args.render:
        env = harness.environment(threads=args.threads, command=COMMAND)
        jobs = [{"method": "base", "seed": 0, "threads": args.threads}] + [
            {"method": m, "seed": s, "threads": args.threads} for s in args.seeds for m in METHODS]

        def launch(job: dict) -> dict:
            command = harness.script_command(__file__, "--run", json.dumps(job))
            return {**harness.run_child(command, label=f"{job['method']} seed {job['seed']}"), "environment": env}

        harness.run_jobs(jobs, log, launch)
    text = report(log.records())
    harness.write_report(args.output, text)
    print(text)


if __name__ == "__main__":
    main()

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
whole UNet. Learning rates: tuned per method on seed 0 over LR_GRID (a 10x smaller grid for full fine-tuning), by
the FD-CNN of digits generated for the validation split (one per real image, 179); a grid edge that wins is
extended by a factor 3, up to LR_EXTENSIONS times. Then seeds 1 and 2 at the chosen rate.
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
LR_GRID = {"lora": (1e-4, 3e-4, 1e-3), "sara": (1e-4, 3e-4, 1e-3), "full": (1e-5, 3e-5, 1e-4)}
LR_EXTENSIONS = 2  # at most this many factor-3 steps past a winning grid edge
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


def validation_fd(model, task) -> float:
    """The tuning score: FD-CNN of digits generated for the validation split's labels vs its real digits."""
    from deltatune.data.diffusion_eval import generation_report

    validation = task.validation.tensors
    return generation_report(model, validation["pixels"], validation["labels"], judge=None)["fd_cnn"]


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
    settings = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=job["lr"], seed=job["seed"], progress=False,
                           eval_every_epoch=False)
    start = time.perf_counter()
    Trainer(model, settings, task.train, None, collate_fn=task.collate, callbacks=callbacks).train()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tuning = {"validation_fd": validation_fd(model, task)} if job.get("validation") else {}
    return {**job, "params": params, "trainable": trainable, **measure(model), **tuning,
            "step_seconds": median_step(timer),
            "train_seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def base_record(threads: int) -> dict:
    import torch

    from deltatune.data import load_task

    torch.set_num_threads(threads)
    return {"method": "base", "seed": 0, **measure(load_task(TASK).build_model())}



# --- the plan: tune on seed 0, then the other seeds at the chosen rate -------------------------------------------
def tuning_records(records: list[dict], method: str) -> list[dict]:
    return [r for r in records if r["method"] == method and "validation_fd" in r]


def chosen_lr(records: list[dict], method: str) -> float:
    """The rate of the lowest validation FD-CNN (ties to the smaller rate)."""
    return min(tuning_records(records, method), key=lambda r: (r["validation_fd"], r["lr"]))["lr"]


def at_edge(records: list[dict], method: str) -> bool:
    tried = sorted(r["lr"] for r in tuning_records(records, method))
    return chosen_lr(records, method) in (tried[0], tried[-1])


def extension_jobs(records: list[dict], threads: int) -> list[dict]:
    """One more rate, a factor 3 past the winning edge, for each method whose best rate is an edge of what it
    tried, while it is fewer than LR_EXTENSIONS steps past its grid."""
    jobs = []
    for method in METHODS:
        tried = sorted(r["lr"] for r in tuning_records(records, method))
        grid = LR_GRID[method]
        best = chosen_lr(records, method)
        if best == tried[-1] and best < grid[-1] * 3 ** LR_EXTENSIONS * 0.99:
            jobs.append(tuning_job(method, float(f"{best * 3:.3g}"), threads))
        elif best == tried[0] and best > grid[0] / 3 ** LR_EXTENSIONS * 1.01:
            jobs.append(tuning_job(method, float(f"{best / 3:.3g}"), threads))
    return jobs


def tuning_job(method: str, lr: float, threads: int) -> dict:
    return {"method": method, "seed": 0, "lr": lr, "threads": threads, "validation": True}


def final_records(records: list[dict], method: str) -> list[dict]:
    """The method's runs at its chosen rate, one per seed."""
    if not tuning_records(records, method):
        return []
    lr = chosen_lr(records, method)
    return [r for r in records if r["method"] == method and r.get("lr") == lr]

# --- report ----------------------------------------------------------------------------------------------------
def _ratio(records: list[dict], method: str, key: str) -> str:
    ratios = []
    for seed in SEEDS:
        mine = [r for r in final_records(records, method) if r["seed"] == seed]
        lora = [r for r in final_records(records, "lora") if r["seed"] == seed]
        if mine and lora:
            ratios.append(mine[0][key] / lora[0][key])
    return f"{statistics.mean(ratios):.2f}x" if ratios else "–"


def report(records: list[dict]) -> str:
    base = next((r for r in records if r["method"] == "base"), None)
    env = next((r["environment"] for r in records if "environment" in r), {})
    lines = ["# SaRA vs LoRA vs full fine-tuning on the glyph DDPM (adapting to handwritten digits)", "",
             f"{harness.environment_line(env) if env else ''}", "", f"    {COMMAND}", "",
             f"Setup: see the docstring of `benchmarks/sara_diffusion.py` ({EPOCHS} epochs of 1,259 digits = "
             f"{EPOCHS * -(-1259 // BATCH)} steps, batch {BATCH}, LoRA rank {RANK}, SaRA at LoRA's count, learning "
             f"rate tuned per method on seed 0 by validation FD-CNN over {LR_GRID}, edges extended). FD-CNN: lower is "
             f"better; accuracies in %; mean ± std over seeds {list(SEEDS)} at each method's chosen rate.", ""]
    if base:
        lines += [f"Base DDPM (no adaptation): digits FD-CNN {base['test_fd']:.2f}, digit-judge accuracy "
                  f"{100 * base['judge_accuracy']:.1f}%; glyphs FD-CNN {base['glyphs']['fd_cnn']:.2f}, GlyphCNN "
                  f"accuracy {100 * base['glyphs']['judge_accuracy']:.1f}%.", ""]
    lines += ["| method | lr | trainable | digits FD-CNN ↓ | digit-judge acc. | glyphs FD-CNN ↓ (base domain) | "
              "glyph acc. (base domain) | step time vs LoRA | peak RSS vs LoRA |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        rows = final_records(records, method)
        if not rows:
            continue
        edge = "*" if at_edge(records, method) else ""
        lines.append(
            f"| {method} | {rows[0]['lr']:g}{edge} | {rows[0]['trainable']:,} | "
            f"{mean_std([r['test_fd'] for r in rows], scale=1, digits=2)} | "
            f"{mean_std([r['judge_accuracy'] for r in rows])} | "
            f"{mean_std([r['glyphs']['fd_cnn'] for r in rows], scale=1, digits=2)} | "
            f"{mean_std([r['glyphs']['judge_accuracy'] for r in rows])} | {_ratio(records, method, 'step_seconds')} | "
            f"{_ratio(records, method, 'peak_rss_mb')} |")
    return "\n".join(lines + tuning_table(records)) + "\n"


def tuning_table(records: list[dict]) -> list[str]:
    """Validation FD-CNN (seed 0) of every rate tried; * marks a chosen rate at the edge of what was tried."""
    lines = ["", "## Learning-rate tuning (validation FD-CNN ↓, seed 0)", "", "| method | rate: FD-CNN | chosen |",
             "| --- | --- | --- |"]
    for method in METHODS:
        tried = sorted(tuning_records(records, method), key=lambda r: r["lr"])
        if tried:
            cells = ", ".join(f"{r['lr']:g}: {r['validation_fd']:.1f}" for r in tried)
            edge = "*" if at_edge(records, method) else ""
            lines.append(f"| {method} | {cells} | {chosen_lr(records, method):g}{edge} |")
    return lines




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
    log = harness.RunLog(args.jsonl, identity=("method", "seed", "lr"))
    if not args.render:
        env = harness.environment(threads=args.threads, command=COMMAND)

        def launch(job: dict) -> dict:
            command = harness.script_command(__file__, "--run", json.dumps(job))
            label = f"{job['method']} seed {job['seed']} lr {job['lr']:g}"
            return {**harness.run_child(command, label=label), "environment": env}

        tuning = [tuning_job(m, lr, args.threads) for m in METHODS for lr in LR_GRID[m]]
        harness.run_jobs([{"method": "base", "seed": 0, "lr": 0.0, "threads": args.threads}] + tuning, log, launch)
        while extra := log.pending(extension_jobs(log.records(), args.threads)):
            harness.run_jobs(extra, log, launch)
        finals = [{"method": m, "seed": s, "lr": chosen_lr(log.records(), m), "threads": args.threads}
                  for s in args.seeds if s != 0 for m in METHODS]
        harness.run_jobs(finals, log, launch)
    text = report(log.records())
    harness.write_report(args.output, text)
    print(text)


if __name__ == "__main__":
    main()

"""FLoRA vs LoRA-on-reshaped-conv at equal trainable counts, on the glyph CNN and the glyph DDPM's UNet (issue 12).

    flock /work/wt/heavy.lock python benchmarks/flora_conv.py            # runs (resumable), then the report
    python benchmarks/flora_conv.py --render                             # the report from the JSONL

The claim (FLoRA, ICLR 2025; lowrank.md §7): a Tucker update that keeps a convolution's kernel modes adapts at
least as well as LoRA on the conv reshaped to (out, in·k·k), at the same trainable count. deltatune's LoRA on a
convolution is exactly that reshaped form (A a k×k conv in → r, B a 1×1 conv r → out: ΔW = B A on the matrix view).

Budget: LoRA rank 8, alpha 8 on every targeted conv; FLoRA's channel rank set by `bench.budget.match_budget` to
LoRA's adapter count (kernel rank 2, scale 4: FLoRA's defaults, the official example's). Backbones and recipes:
- cnn: task glyphs-rotated-cnn (the 62 glyph classes rotated, blurred and noisy; GlyphCNN, every conv adapted,
  the pretrained head trained too, the same for both), TRAIN images (stratified, seed 0), EPOCHS_CNN epochs,
  validation / test on fixed stratified subsets; metric accuracy.
- unet: task diffusion-handwritten (the glyph DDPM learns scikit-learn's digits); every UNet conv but conv_out
  (one output channel: LoRA rank 8 does not fit it), EPOCHS_UNET epochs. Validation metric (lr choice): the
  held-out denoising loss (ε-MSE at fixed timesteps and noise, REPEATS draws per digit; cheap and low-noise);
  reported: the same loss on test and, at the chosen lr, the task's FD-CNN of GENERATED generated digits (for the
  first test labels; DPM-Solver++ 10 steps, noise seed 0) vs all test digits, and the frozen digit judge's accuracy
  on them (fewer samples than the task's 500 for time: comparable between methods, not with other tables).
Protocol (BENCHMARKING.md): AdamW, batch 32, linear decay; one lr grid LR_GRID for both methods, chosen per method
and backbone on validation at seed 0 (extended by one step when the best sits at an edge); seeds 1 and 2 then run
at that lr. Every run is its own child process (peak RSS is the run's own). Timing: one child per backbone and
repeat trains LoRA and FLoRA on the same batch, alternating blocks of BLOCK steps, and times merged inference
(FLoRA merged and unloaded) against the base model the same way.
"""
from __future__ import annotations

import argparse
import copy
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
OUT = ROOT / "benchmarks/results/flora_conv"
COMMAND = "flock /work/wt/heavy.lock python benchmarks/flora_conv.py"
TASKS = {"cnn": "glyphs-rotated-cnn", "unet": "diffusion-handwritten"}
TARGETING = {"cnn": {}, "unet": {"targets": None, "layer_types": ("conv",), "exclude": ("conv_out",)}}
LORA = {"rank": 8, "alpha": 8}
METHODS = ("lora", "flora")
LR_GRID = (1e-3, 3e-3, 1e-2)
EDGE_STEP = 10 ** 0.5  # one more grid step (x3.16) when the best rate is at an edge
SEEDS = (0, 1, 2)
TRAIN, EPOCHS_CNN, VALIDATION, TEST = 1000, 2, 500, 1000
GENERATED = 200  # digits generated per FD-CNN (for the first GENERATED test labels), against all 359 test digits
EPOCHS_UNET, REPEATS, BATCH = 2, 4, 32
BLOCK, ROUNDS, WARMUP = 5, 4, 2
IDENTITY = ("backbone", "method", "lr", "seed", "phase")


# --- budgets ---------------------------------------------------------------------------------------------------
def method_params(backbone: str, method: str) -> dict[str, Any]:
    """LoRA rank 8; FLoRA's rank matched to LoRA's adapter count on the same targets."""
    from deltatune.bench.budget import match_budget, task_counter
    from deltatune.data import load_task

    common = dict(TARGETING[backbone])
    if method == "lora":
        return {**common, **LORA}
    task = load_task(TASKS[backbone])
    target = task_counter(task, "lora", common=common, batch_size=BATCH)(LORA)
    match = match_budget(method, target, task_counter(task, method, common=common, batch_size=BATCH))
    return {**common, **match.params()}


# --- one training run (child) ----------------------------------------------------------------------------------
def median_step(timer: harness.StepTimer) -> float:
    return statistics.median(timer.seconds[WARMUP:] or timer.seconds)


def train(task, job: dict, epochs: int, evaluation=None):
    """The adapted model after training (deltatune Trainer, recipe.prepare_model), its step timer and seconds."""
    from deltatune.recipe import prepare_model
    from deltatune.train import TrainConfig, Trainer

    model, config = prepare_model(task, job["method"], job["params"], seed=job["seed"], batch_size=BATCH)
    steps = epochs * -(-len(task.train) // BATCH)
    timer = harness.StepTimer()
    settings = TrainConfig(epochs=epochs, batch_size=BATCH, lr=job["lr"], seed=job["seed"], progress=False,
                           eval_every_epoch=False)
    start = time.perf_counter()
    Trainer(model, settings, task.train, evaluation, collate_fn=task.collate,
            callbacks=(*config.training_callbacks(model, steps), timer)).train()
    return model, timer, time.perf_counter() - start


def run_cnn(job: dict) -> dict:
    from deltatune.data import evaluate_accuracy, load_task
    from deltatune.recipe import evaluation_subsets

    task = evaluation_subsets(load_task(TASKS["cnn"], train_size=TRAIN, seed=0), VALIDATION, TEST)
    model, timer, seconds = train(task, job, EPOCHS_CNN)
    return {"validation": evaluate_accuracy(model, task.validation, batch_size=512),
            "test": evaluate_accuracy(model, task.test, batch_size=512), **_costs(model, timer, seconds)}


def denoising_loss(model, dataset, seed: int = 1234) -> float:
    """Mean ε-MSE over the split's digits at REPEATS fixed (timestep, noise) draws each (eval mode, no dropout)."""
    import torch

    pixels, labels = dataset.tensors["pixels"], dataset.tensors["labels"]
    generator = torch.Generator().manual_seed(seed)
    pixels, labels = pixels.repeat(REPEATS, 1, 1, 1), labels.repeat(REPEATS)
    timesteps = torch.randint(0, model.config.train_timesteps, (len(labels),), generator=generator)
    noise = torch.randn(pixels.shape, generator=generator)
    model.eval()
    with torch.no_grad():
        return float(model.denoising_loss(pixels, labels, timesteps, noise).loss)


def run_unet(job: dict) -> dict:
    from deltatune.data import load_task

    task = load_task(TASKS["unet"])
    model, timer, seconds = train(task, job, EPOCHS_UNET)
    record = {"validation": denoising_loss(model, task.validation), "test": denoising_loss(model, task.test),
              **_costs(model, timer, seconds)}
    if job["phase"] == "final":
        record["generation"] = generation(model, task)
    return record


def generation(model, task) -> dict:
    from deltatune.data.diffusion_eval import generation_report, load_digit_judge

    test = task.test.tensors
    return generation_report(model, test["pixels"], test["labels"][:GENERATED], judge=load_digit_judge(),
                             min_samples=0)


def _costs(model, timer: harness.StepTimer, seconds: float) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "step_seconds": median_step(timer), "train_seconds": round(seconds, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --- timing (child) --------------------------------------------------------------------------------------------
def timing(job: dict) -> dict:
    """Training steps of LoRA and FLoRA alternated block by block on one batch; merged FLoRA vs base inference."""
    import torch

    import deltatune as dt
    from deltatune.data import load_task
    from deltatune.recipe import prepare_model

    task = load_task(TASKS[job["backbone"]])
    batch = task.collate([task.train[i] for i in range(BATCH)])
    models = {m: prepare_model(task, m, job["params"][m], seed=0, batch_size=BATCH)[0] for m in METHODS}
    steps = {m: _train_step(model, batch) for m, model in models.items()}
    train_seconds = _alternate(steps)
    flora = models["flora"]
    with torch.no_grad():  # a trained-looking update, so the merged weights differ from the base
        for name, parameter in flora.named_parameters():
            if parameter.requires_grad and "flora_core" in name:
                parameter.normal_(0, 0.01)
    base = task.build_model().eval()
    merged = dt.unload(copy.deepcopy(flora), merge=True).eval()
    run_base, run_merged, run_unmerged = (_inference(m, batch, job["backbone"]) for m in (base, merged, flora.eval()))
    gap = float((run_merged() - run_unmerged()).abs().max())
    infer_seconds = _alternate({"base": run_base, "merged": run_merged, "unmerged": run_unmerged})
    return {"train_step_seconds": train_seconds, "inference_seconds": infer_seconds, "merge_max_abs_gap": gap}


def _train_step(model, batch: dict):
    import torch

    from deltatune.data.datasets import model_inputs
    from deltatune.train.losses import takes_labels

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        torch.manual_seed(0)  # the DDPM draws its timesteps and noise from the global generator
        if takes_labels(model):
            loss = model(**batch).loss
        else:
            loss = torch.nn.functional.cross_entropy(model(**model_inputs(batch)), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _inference(model, batch: dict, backbone: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    if backbone == "unet":
        timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
        noise = torch.randn(batch["pixels"].shape, generator=generator)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return model.denoising_loss(batch["pixels"], batch["labels"], timesteps, noise).predicted_noise
    else:
        def forward() -> torch.Tensor:
            with torch.no_grad():
                return model(batch["pixels"])
    return forward


def _alternate(calls: dict) -> dict[str, float]:
    """Median seconds per call of each contender: WARMUP calls each, then ROUNDS rounds of BLOCK calls A B A B."""
    for call in calls.values():
        for _ in range(WARMUP):
            call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            for _ in range(BLOCK):
                start = time.perf_counter()
                call()
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def run(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    if job["phase"] == "timing":
        return {**job, **timing(job)}
    return {**job, **(run_cnn(job) if job["backbone"] == "cnn" else run_unet(job))}


# --- the grid (parent) -----------------------------------------------------------------------------------------
def better(backbone: str, a: float, b: float) -> bool:
    """a is a better validation score than b (accuracy up, denoising loss down)."""
    return a > b if backbone == "cnn" else a < b


def best_lr(log: harness.RunLog, backbone: str, method: str) -> tuple[float, list[float]] | None:
    """The chosen rate and the grid tried (with edge extensions) at seed 0, or None while the grid is unfinished."""
    tried = [{**r} for r in log.records() if r["backbone"] == backbone and r["method"] == method
             and r["phase"] == "tune"]
    rates = sorted({r["lr"] for r in tried})
    if not set(LR_GRID) <= set(rates):
        return None
    best = tried[0]
    for record in tried[1:]:
        if better(backbone, record["validation"], best["validation"]):
            best = record
    return best["lr"], rates


def extension(log: harness.RunLog, backbone: str, method: str) -> float | None:
    """The next rate to try when the best rate tried sits at an edge of the rates tried (once per side)."""
    chosen = best_lr(log, backbone, method)
    if chosen is None:
        return None
    lr, rates = chosen
    if lr == rates[-1] and lr >= max(LR_GRID) and len([r for r in rates if r > max(LR_GRID)]) < 1:
        return lr * EDGE_STEP
    if lr == rates[0] and lr <= min(LR_GRID) and len([r for r in rates if r < min(LR_GRID)]) < 1:
        return lr / EDGE_STEP
    return None


def run_phase(jobs: list[dict], log: harness.RunLog, env: dict) -> None:
    """Run the jobs the log lacks (each in a child), then re-write the report, so a stopped run leaves one."""
    def launch(job: dict) -> dict:
        command = harness.script_command(__file__, "--run", json.dumps(job))
        label = f"{job['backbone']} {job['method']} lr {job['lr']:g} seed {job['seed']} ({job['phase']})"
        return {**harness.run_child(command, label=label), "environment": env}

    harness.run_jobs(jobs, log, launch, describe=lambda j: f"{j['backbone']} {j['method']} lr {j['lr']:g} "
                                                         f"seed {j['seed']} {j['phase']}")
    write(log, OUTPUT[0])


def run_all(log: harness.RunLog, threads: int, backbones: list[str]) -> None:
    env = harness.environment(threads=threads, command=COMMAND)
    for backbone in backbones:
        params = {m: method_params(backbone, m) for m in METHODS}
        base = {"backbone": backbone, "threads": threads}
        run_phase([{**base, "method": "both", "lr": 0, "seed": r, "phase": "timing", "params": params}
                   for r in (0, 1)], log, env)
        tune = [{**base, "method": m, "lr": lr, "seed": 0, "phase": "tune", "params": params[m]}
                for m in METHODS for lr in LR_GRID]
        run_phase(tune, log, env)
        for method in METHODS:
            for _ in range(2):  # at most one extension per side
                extra = extension(log, backbone, method)
                if extra is not None:
                    run_phase([{**base, "method": method, "lr": extra, "seed": 0, "phase": "tune",
                                "params": params[method]}], log, env)
        final = []
        for method in METHODS:
            lr = best_lr(log, backbone, method)[0]
            seeds = SEEDS if backbone == "unet" else SEEDS[1:]  # the UNet's seed 0 re-runs to add generation
            final += [{**base, "method": method, "lr": lr, "seed": s, "phase": "final", "params": params[method]}
                      for s in seeds]
        run_phase(final, log, env)


# --- the report ------------------------------------------------------------------------------------------------
def seed_records(records: list[dict], backbone: str, method: str) -> list[dict]:
    """The runs at the chosen rate, one per seed (final runs; the CNN's seed 0 is its tuning run)."""
    rows = [r for r in records if r["backbone"] == backbone and r["method"] == method and r["phase"] == "final"]
    if not rows:
        return []
    lr = rows[0]["lr"]
    if backbone == "cnn":
        rows = [r for r in records if r["backbone"] == "cnn" and r["method"] == method and r["phase"] == "tune"
                and r["lr"] == lr] + rows
    return sorted(rows, key=lambda r: r["seed"])


def ratio(records: list[dict], backbone: str, key: str) -> str:
    """FLoRA / LoRA of `key`, per seed at the chosen rates, as "mean (min–max)"."""
    lora = {r["seed"]: r[key] for r in seed_records(records, backbone, "lora")}
    flora = {r["seed"]: r[key] for r in seed_records(records, backbone, "flora")}
    values = [flora[s] / lora[s] for s in flora if s in lora]
    return f"{statistics.mean(values):.2f}x ({min(values):.2f}–{max(values):.2f})" if values else "–"


def tuning_table(records: list[dict], backbone: str) -> list[str]:
    lines = ["| method | lr | validation (seed 0) |", "| --- | ---: | ---: |"]
    for r in sorted((r for r in records if r["backbone"] == backbone and r["phase"] == "tune"),
                    key=lambda r: (r["method"], r["lr"])):
        lines.append(f"| {r['method']} | {r['lr']:.2g} | {r['validation']:.4f} |")
    return lines


def result_table(records: list[dict], backbone: str) -> list[str]:
    unet = backbone == "unet"
    header = ("| method | trainable (adapter) | lr | validation loss ↓ | test loss ↓ | FD-CNN ↓ | judge acc. | seeds |"
              if unet else "| method | trainable (adapter) | lr | validation acc. | test acc. | seeds |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if unet else " ---: |")]
    for method in METHODS:
        rows = seed_records(records, backbone, method)
        if not rows:
            continue
        count = adapter_count(records, backbone, method)
        scale, digits = (1, 4) if unet else (100, 1)
        cells = [method, f"{count:,}", f"{rows[0]['lr']:.2g}", mean_std([r["validation"] for r in rows], scale=scale,
                 digits=digits), mean_std([r["test"] for r in rows], scale=scale, digits=digits)]
        if unet:
            gen = [r["generation"] for r in rows if "generation" in r]
            cells += [mean_std([g["fd_cnn"] for g in gen], scale=1, digits=2),
                      mean_std([g["judge_accuracy"] for g in gen])]
        lines.append("| " + " | ".join(cells + [str(len(rows))]) + " |")
    return lines


def adapter_count(records: list[dict], backbone: str, method: str) -> int:
    """Trainable numbers without the head both methods train (the CNN's classifier: 128·62 + 62)."""
    rows = seed_records(records, backbone, method)
    head = 128 * 62 + 62 if backbone == "cnn" else 0
    return rows[0]["trainable"] - head


def timing_lines(records: list[dict], backbone: str) -> list[str]:
    lines = []
    for r in (r for r in records if r["backbone"] == backbone and r["phase"] == "timing"):
        train, infer = r["train_step_seconds"], r["inference_seconds"]
        lines.append(f"- repeat {r['seed']}: training step FLoRA / LoRA = {train['flora'] / train['lora']:.2f}x "
                     f"(medians {1e3 * train['flora']:.1f} / {1e3 * train['lora']:.1f} ms); merged FLoRA inference / "
                     f"base = {infer['merged'] / infer['base']:.2f}x, unmerged / base = "
                     f"{infer['unmerged'] / infer['base']:.2f}x (base {1e3 * infer['base']:.1f} ms); merged vs "
                     f"unmerged max |Δ| {r['merge_max_abs_gap']:.1e}")
    return lines


def verdict(records: list[dict], backbone: str) -> str:
    means = {}
    for method in METHODS:
        rows = seed_records(records, backbone, method)
        if len(rows) < len(SEEDS):
            return "not measured yet (PARTIAL)"
        means[method] = statistics.mean(r["test"] for r in rows)
    holds = not better(backbone, means["lora"], means["flora"])
    unit = "accuracy" if backbone == "cnn" else "denoising loss"
    return (f"FLoRA ≥ LoRA-on-reshaped-conv at equal parameters: **{'holds' if holds else 'does not hold'}** "
            f"(test {unit} {means['flora']:.4f} vs {means['lora']:.4f}, mean of {len(SEEDS)} seeds)")


def section(records: list[dict], backbone: str) -> list[str]:
    title = {"cnn": "GlyphCNN on glyphs-rotated-cnn", "unet": "glyph DDPM UNet on diffusion-handwritten"}[backbone]
    lines = [f"## {title}", "", verdict(records, backbone), ""]
    if any(r["backbone"] == backbone and r["phase"] == "final" for r in records):
        lines += result_table(records, backbone) + [""]
        lines += [f"Step time FLoRA / LoRA in the training runs (same seed): {ratio(records, backbone, 'step_seconds')}"
                  f"; peak RSS of the run's process FLoRA / LoRA: {ratio(records, backbone, 'peak_rss_mb')}.", ""]
    lines += ["Side-by-side timing (one process, blocks alternated, medians):"] + timing_lines(records, backbone)
    return lines + ["", "Learning-rate grid (seed 0, validation):", ""] + tuning_table(records, backbone) + [""]


def report(records: list[dict]) -> str:
    env = next((r["environment"] for r in records if "environment" in r), {})
    done = {b: len([r for r in records if r["backbone"] == b and r["phase"] == "final"]) for b in TASKS}
    partial = any(done[b] < len(METHODS) * (len(SEEDS) if b == "unet" else len(SEEDS) - 1) for b in TASKS)
    lines = ["# FLoRA vs LoRA-on-reshaped-conv at equal trainable counts (GlyphCNN, glyph DDPM UNet)", ""]
    if partial:
        lines += [f"**PARTIAL**: not every run has finished; resume with `{COMMAND}` (finished runs are kept).", ""]
    lines += [harness.environment_line(env) if env else "", "", f"    {COMMAND}", "",
              f"Setup: the docstring of `benchmarks/flora_conv.py`. LoRA rank {LORA['rank']} (alpha {LORA['alpha']}), "
              f"FLoRA channel rank matched to LoRA's adapter count, kernel rank 2, scale 4; lr grid {list(LR_GRID)} "
              f"for both, chosen on validation at seed 0; CNN: {TRAIN} training images, {EPOCHS_CNN} epochs, "
              f"validation {VALIDATION}, test {TEST} images (accuracy in %); UNet: {EPOCHS_UNET} epochs of 1,259 "
              f"digits, denoising loss over {REPEATS} fixed draws per digit. Mean ± std over seeds {list(SEEDS)}. "
              "Raw runs: flora_conv.jsonl.", ""]
    for backbone in TASKS:
        lines += section(records, backbone)
    return "\n".join(lines) + "\n"


OUTPUT = [OUT.with_suffix(".md")]  # the report's path (main sets it from --output)


def write(log: harness.RunLog, output: Path) -> str:
    text = report(log.records())
    harness.write_report(output, text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", type=Path, default=OUT.with_suffix(".jsonl"))
    parser.add_argument("--output", type=Path, default=OUT.with_suffix(".md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbones", nargs="*", default=list(TASKS))
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        harness.emit(run(json.loads(args.run)))
        return
    log = harness.RunLog(args.jsonl, identity=IDENTITY)
    OUTPUT[0] = args.output
    if not args.render:
        run_all(log, args.threads, args.backbones)
    print(write(log, args.output))


if __name__ == "__main__":
    main()

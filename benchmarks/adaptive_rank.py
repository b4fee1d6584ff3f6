"""Budget-adaptive low rank (AdaLoRA, IncreLoRA, TriAdaptLoRA, CoLoRA-style) vs LoRA and full fine-tuning.

Task: `wordnet-nouns` (noun glosses -> 10 lexicographer classes), all-MiniLM-L6-v2 + mean pooling + a Linear head
(trained by every method). Every method adapts the same 36 encoder Linear layers (query, key, value, attention
output, intermediate, output of the 6 layers). Budgets: the final live rank averages 2 or 8 per module, i.e. the
trainable count of LoRA at rank 2 (82,944) or 8 (331,776) on those layers; each method's real live count is in
the table (AdaLoRA counts λ, TriAdaptLoRA its core; triplets moved to the wider FFN matrices cost more).

Training (the machine has 2 shared cores): a fixed label-stratified 1,000-example subset of the training split
(seed 0 for every run), 2 epochs, batch 32 (64 steps), max length 32 (each batch trimmed to its longest gloss,
which changes no result), the deltatune Trainer's defaults (AdamW, no weight decay, linear decay, no warm-up,
clipping 1.0), each method's regularizer and trainer callbacks (its allocator). Scale-matched alpha: LoRA and
CoLoRA alpha = rank, AdaLoRA alpha = init rank, IncreLoRA / TriAdaptLoRA alpha = target rank, so every method's
components enter ΔW with scale ~1 at the final budget. Schedules scaled to 64 steps (see `method_config`).

Learning rate: per method, the best of {1e-3, 3e-3, 1e-2, 3e-2} (extended to 1e-1, then 3e-1, while a method's best
is the highest rate it tried) on a fixed 500-example validation subset, with seed 0
at each budget; full fine-tuning uses the recipe's 5e-5 (chosen on validation by the data
task's authors). Then seeds 0, 1, 2 (head and adapter init, data order): test accuracy (2,000 examples) mean ± std.

Second backbone (`--backbone vit`; results/adaptive_rank_vit.md and .jsonl): the shipped pretrained GlyphViT on
`glyphs-novel-vit` (24 Greek letters never seen in pretraining, a fresh 24-way head trained by every method; LoRA
there is far from ceiling, ~85% test). Every method adapts the 24 Linear layers of the 4 blocks (q_proj, k_proj,
v_proj, o_proj, mlp.fc1, mlp.fc2); same methods, budgets (LoRA r2: 18,432; r8: 73,728), rate grid and extension
rule, seeds. Recipe: a fixed label-stratified 3,200-image subset of the 4,752 training images (seed 0), 1 epoch of
batch 32 = 100 steps, the same Trainer defaults; validation and test: the whole splits (720 / 1,200 images).
Schedule lengths chosen in steps for the 64-step MiniLM recipe are scaled by steps/64 (`Backbone.scaled`), so at
100 steps AdaLoRA masks 14 times (steps 12-50, ΔT = 3) and IncreLoRA grows every 2 steps from step 6 to step 28
(budget 2) / 18 (budget 8); TriAdaptLoRA keeps its own defaults, as on MiniLM (an event every step from step 1,
the last at step 24 / 14). What was allocated then trains for 50-80 steps. Full fine-tuning's rate is
tuned too, on {3e-4, 1e-3, 3e-3} (seed 0, validation).
`--backbone vit-long`: the same on the whole training split for 2 epochs (298 steps), budget 2 only: the
low-budget claim at a 3x longer recipe (results/adaptive_rank_vit_long.*; not run yet: see adaptive_rank_vit.md).
What differs between the backbones (task, sizes, targets, module kinds, full fine-tuning's rates, input keys) is
one row of `BACKBONES`; the plan, run and report code is shared.

Modes:
    accuracy  the table above (a fresh child process per run, `--workers` at a time, or `--in-process` one at a
              time; resumable: finished runs are appended to the JSONL file and skipped by a re-run; the loop is
              deltatune.bench.harness's)
    timing    step time of each method vs LoRA, side by side (A B A B ...), during allocation and after it (MiniLM)
    peft      AdaLoRA vs peft's AdaLoRA on MiniLM: same config, seed and batches -> final per-layer ranks
    report    write the Markdown table and the rank heat maps from the JSONL and JSON files (no training)

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py accuracy --workers 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py timing
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py peft
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py report
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py accuracy --backbone vit --workers 1 --in-process
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py report --backbone vit
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ADAPTERS = ("lora", "adalora", "increlora", "triadaptlora", "colora")
METHODS = (*ADAPTERS, "full")
BUDGETS = (2, 8)
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
LR_EXTENSION = (1e-1, 3e-1)  # tried in turn for a method while its best rate is the highest one tried
SEEDS = (0, 1, 2)
SCHEDULE_PLOT_BUDGET = 8  # the budget whose allocation schedules are plotted
REFERENCE_STEPS = 64  # the MiniLM recipe's length, for which the absolute schedule lengths below were chosen


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What differs between the backbones; methods, budgets, rate grid, seeds and the run loop are shared."""

    name: str
    title: str  # the report's heading
    task: str  # a deltatune.data task
    train_examples: int  # the training examples one epoch sees (the whole split when `train_size` is None)
    train_size: int | None  # passed to load_task: a label-stratified subset (seed 0), or None for the whole split
    validation_size: int | None  # a label-stratified validation subset (seed 0), or None for the whole split
    test_size: int | None  # likewise for the test split
    epochs: int
    batch: int
    targets: str  # the adapted Linear layers (regex)
    modules: int  # how many layers `targets` matches
    layers: int  # encoder blocks
    kinds: tuple[tuple[str, str], ...]  # (substring of a module path, label), first match wins
    full_lrs: tuple[float, ...]  # full fine-tuning's rates: one fixed rate, or a grid tuned on validation
    full_frozen: tuple[str, ...]  # parameter prefixes full fine-tuning leaves frozen (unused by the model)
    text: bool  # token inputs (input_ids, attention_mask; batches trimmed) or images (pixels)
    stem: str  # results/<stem>.md, .jsonl and plot names
    budgets: tuple[int, ...] = BUDGETS  # the budgets compared (a subset for a check of one claim)

    @property
    def steps(self) -> int:
        return self.epochs * -(-self.train_examples // self.batch)

    def scaled(self, reference: int) -> int:
        """A schedule length chosen (in steps) for the 64-step MiniLM recipe, scaled to this recipe's length."""
        return max(1, round(reference * self.steps / REFERENCE_STEPS))


BACKBONES = {
    "minilm": Backbone(
        name="minilm", title="wordnet-nouns, MiniLM", task="wordnet-nouns", train_examples=1000, train_size=1000,
        validation_size=500, test_size=None, epochs=2, batch=32,
        targets=(r"backbone\.encoder\.layer\.\d+\."
                 r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"),
        modules=36, layers=6,
        kinds=(("query", "query"), ("key", "key"), ("value", "value"), ("attention.output", "attn.out"),
               ("intermediate", "ffn.in"), ("output", "ffn.out")),
        full_lrs=(5e-5,), full_frozen=("backbone.pooler.",), text=True, stem="adaptive_rank"),
    "vit": Backbone(
        name="vit", title="glyphs-novel-vit, GlyphViT", task="glyphs-novel-vit", train_examples=3200,
        train_size=3200, validation_size=None, test_size=None, epochs=1, batch=32,
        targets=r"backbone\.layers\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))",
        modules=24, layers=4,
        kinds=(("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "attn.out"),
               ("fc1", "ffn.in"), ("fc2", "ffn.out")),
        full_lrs=(3e-4, 1e-3, 3e-3), full_frozen=(), text=False, stem="adaptive_rank_vit"),
}
# the low-budget claim again at a 3x longer recipe: the whole training split, 2 epochs (298 steps), budget 2 only
BACKBONES["vit-long"] = dataclasses.replace(
    BACKBONES["vit"], name="vit-long", title="glyphs-novel-vit, GlyphViT, 298 steps", train_examples=4752,
    train_size=None, epochs=2, stem="adaptive_rank_vit_long", budgets=(2,))
MINILM = BACKBONES["minilm"]
if os.environ.get("ADAPTIVE_RANK_SMOKE"):  # a few-minute end-to-end check of the script itself
    BACKBONES = {
        "minilm": dataclasses.replace(MINILM, train_examples=800, train_size=800, validation_size=64, epochs=1,
                                      test_size=100),
        "vit": dataclasses.replace(BACKBONES["vit"], train_examples=800, train_size=800, validation_size=120,
                                   test_size=120, epochs=1),
    }
    MINILM = BACKBONES["minilm"]


# --- data ---------------------------------------------------------------------------------------------------
def task_data(backbone: Backbone = MINILM):
    from deltatune.data import load_task
    from deltatune.data.sampling import stratified_subset

    task = load_task(backbone.task, train_size=backbone.train_size, seed=0, max_length=32)
    if len(task.train) != backbone.train_examples:  # the schedules were built for `steps`: they must agree
        raise RuntimeError(f"backbone {backbone.name!r}: the training split has {len(task.train)} examples, the "
                           f"table says {backbone.train_examples}; fix train_examples in BACKBONES")
    validation = task.validation
    if backbone.validation_size is not None:
        validation = validation.subset(stratified_subset(validation.labels.tolist(), backbone.validation_size, 0))
    if backbone.test_size is not None:
        test = task.test.subset(stratified_subset(task.test.labels.tolist(), backbone.test_size, 0))
        task = dataclasses.replace(task, test=test)
    return task, validation


def trimmed(batch: dict) -> dict:
    """Drop padding columns beyond the longest sequence of the batch (attention-masked, so outputs are equal)."""
    length = int(batch["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :length] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}


def trimming_collate(task, backbone: Backbone = MINILM):
    if not backbone.text:
        return task.collate
    return lambda items: trimmed(task.collate(items))


def model_inputs(batch: dict, backbone: Backbone = MINILM) -> dict:
    """The model's keyword inputs of a collated batch."""
    if backbone.text:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {"pixels": batch["pixels"]}


@torch.no_grad()
def accuracy(model: nn.Module, dataset, task, batch_size: int = 64, backbone: Backbone = MINILM) -> float:
    """Test accuracy; text in length-sorted, trimmed batches (same predictions, less padding)."""
    model.eval()
    order = list(range(len(dataset)))
    if backbone.text:
        lengths = torch.stack([dataset[i]["attention_mask"].sum() for i in range(len(dataset))])
        order = torch.argsort(lengths, stable=True).tolist()
    collate = trimming_collate(task, backbone)
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[start:start + batch_size]])
        logits = model(**model_inputs(batch, backbone))
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    model.train()
    return correct / len(dataset)


# --- methods ------------------------------------------------------------------------------------------------
def method_config(method: str, budget: int, backbone: Backbone = MINILM):
    """The benchmark's config of each method at a budget (average final rank per module). Schedule lengths given
    in steps were chosen for the 64-step MiniLM recipe and scale with the recipe's length (`Backbone.scaled`);
    shares of training (AdaLoRA's t_i, t_f) scale by themselves."""
    import deltatune as dt

    common = dict(targets=backbone.targets, extra_trainable=("classifier",))
    if method == "lora":
        return dt.config_for("lora", rank=budget, alpha=float(budget), **common)
    if method == "adalora":
        init = {2: 4, 8: 12}.get(budget, budget * 3 // 2)  # the paper's initial ranks for final 2 / 8 (App. C)
        # t_i 10%, t_f 50% of training (defaults); ΔT = 2 in a 64-step run (the paper uses ΔT = 1 on short RTE)
        return dt.config_for("adalora", init_rank=init, target_rank=budget, alpha=float(init),
                             mask_interval=backbone.scaled(2), **common)
    if method == "increlora":
        top = {2: 2, 8: 6}.get(budget, 2)  # the official scripts' top_h for target ranks 2 and 8
        return dt.config_for("increlora", init_rank=1, target_rank=budget, alpha=float(budget), top_modules=top,
                             initial_warmup=backbone.scaled(3), interval=backbone.scaled(1),
                             restart_warmup=backbone.scaled(2), **common)
    if method == "triadaptlora":
        return dt.config_for("triadaptlora", init_rank=1, target_rank=budget, alpha=float(budget), **common)
    if method == "colora":
        return dt.config_for("colora", rank=budget, alpha=float(budget), probe=0.25, **common)
    raise ValueError(method)


def build(method: str, budget: int, seed: int, task, config=None, backbone: Backbone = MINILM):
    import deltatune as dt

    torch.manual_seed(seed)
    model = task.build_model()
    if method == "full":
        model.requires_grad_(True)
        for name, parameter in model.named_parameters():  # e.g. MiniLM's pooler, unused by mean pooling
            if name.startswith(backbone.full_frozen):
                parameter.requires_grad_(False)
        return model, None
    config = config or method_config(method, budget, backbone)
    return dt.adapt(model, config), config


def live_parameters(model: nn.Module, method: str) -> int:
    """Trainable numbers the adapters use at the end (live components; the head excluded)."""
    import deltatune as dt
    from deltatune.allocate import describe_allocation

    if method == "full":
        return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier"))
    described = describe_allocation(model)
    if described:
        return described["default"]["parameters"]
    return sum(p.numel() for _, _, d in dt.iter_deltas(model) for p in d.parameters())


def run(job: dict, work_dir: Path, backbone: Backbone = MINILM) -> dict:
    """Train one (method, budget, seed, lr) and evaluate; saves the adapter for the heat maps."""
    import deltatune as dt
    from deltatune.allocate import describe_allocation
    from deltatune.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    task, validation = task_data(backbone)
    model, config = build(job["method"], job["budget"], job["seed"], task, backbone=backbone)
    callbacks = config.training_callbacks(model, backbone.steps) if config is not None else []
    settings = TrainConfig(epochs=backbone.epochs, batch_size=backbone.batch, lr=job["lr"], seed=job["seed"],
                           progress=False, eval_every_epoch=False)
    trainer = Trainer(model, settings, task.train, collate_fn=trimming_collate(task, backbone), callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    result = dict(job, train_seconds=time.perf_counter() - started, steps=trainer.global_step,
                  live_parameters=live_parameters(model, job["method"]))
    if job.get("validation"):
        result["validation"] = accuracy(model, validation, task, backbone=backbone)
    if job.get("test"):
        result["test"] = accuracy(model, task.test, task, backbone=backbone)
    described = describe_allocation(model) if config is not None else {}
    if described:
        result["ranks"] = {p: m["rank"] for p, m in described["default"]["modules"].items()}
    if config is not None:
        dt.save_adapter(model, work_dir / job_name(job))
    return result


def job_name(job: dict) -> str:
    return f"{job['method']}-r{job['budget']}-s{job['seed']}-lr{job['lr']:g}"


# --- the accuracy plan --------------------------------------------------------------------------------------
def run_identity(job_or_record: dict) -> list | None:
    """A run is its method, budget, seed and rate, and whether it is scored on validation (a tuning run): a
    validation record (a float) and a tuning job (validation=True) are the same run; final runs have neither."""
    if any(key not in job_or_record for key in ("method", "budget", "seed", "lr")):
        return None
    return [job_or_record[key] for key in ("method", "budget", "seed", "lr")] + [
        job_or_record.get("validation") not in (None, False)]


def tuning_jobs(backbone: Backbone = MINILM) -> list[dict]:
    """Every method's rate is tuned at every budget it is compared at (seed 0, validation); full fine-tuning's
    too where the backbone gives it a grid (budget 0)."""
    jobs = [dict(method=m, budget=budget, seed=0, lr=lr, validation=True, test=True)
            for budget in backbone.budgets for m in ADAPTERS for lr in LR_GRID]
    if len(backbone.full_lrs) > 1:
        jobs += [dict(method="full", budget=0, seed=0, lr=lr, validation=True, test=True) for lr in backbone.full_lrs]
    return jobs


def _tuning_records(records: list[dict], method: str, budget: int) -> list[dict]:
    return [r for r in records if r["method"] == method and r["budget"] == budget and r["seed"] == 0
            and isinstance(r.get("validation"), float)]


def extension_jobs(records: list[dict], backbone: Backbone = MINILM) -> list[dict]:
    """The next rate above the grid for every (method, budget) whose best rate so far is the highest it tried."""
    jobs = []
    for budget in backbone.budgets:
        for method in ADAPTERS:
            tried = sorted(r["lr"] for r in _tuning_records(records, method, budget))
            if not tried or chosen_lr(records, method, budget, backbone) != tried[-1]:
                continue
            higher = [lr for lr in LR_EXTENSION if lr > tried[-1]]
            if higher:
                jobs.append(dict(method=method, budget=budget, seed=0, lr=higher[0], validation=True, test=True))
    return jobs


def chosen_lr(records: list[dict], method: str, budget: int, backbone: Backbone = MINILM) -> float:
    """The best validation rate of `method` at `budget` (ties to the smaller rate); full: the backbone's one
    fixed rate, or the best of its grid."""
    if method == "full" and len(backbone.full_lrs) == 1:
        return backbone.full_lrs[0]
    return max(_tuning_records(records, method, budget), key=lambda r: (r["validation"], -r["lr"]))["lr"]


def final_jobs(records: list[dict], backbone: Backbone = MINILM) -> list[dict]:
    tuned_full = len(backbone.full_lrs) > 1
    jobs = []
    for seed in SEEDS:
        for budget in backbone.budgets:
            for method in ADAPTERS:
                if seed != 0:  # seed 0 is the tuning run at the chosen rate
                    jobs.append(dict(method=method, budget=budget, seed=seed,
                                     lr=chosen_lr(records, method, budget, backbone), test=True))
        if not (tuned_full and seed == 0):
            jobs.append(dict(method="full", budget=0, seed=seed, lr=chosen_lr(records, "full", 0, backbone),
                             test=True))
    return jobs


def run_child(job: dict, work_dir: Path, backbone: Backbone = MINILM) -> dict:
    command = harness.script_command(__file__, "one", json.dumps(job), "--work-dir", str(work_dir),
                                     "--backbone", backbone.name)
    result = harness.run_child(command, label=f"run {job_name(job)}")
    print(f"done {job_name(job)}", flush=True)
    return result


def run_jobs(jobs: list[dict], log: harness.RunLog, work_dir: Path, workers: int,
             backbone: Backbone = MINILM, in_process: bool = False) -> None:
    def one(job: dict) -> dict:
        if not in_process:
            return run_child(job, work_dir, backbone)
        result = run(job, work_dir, backbone)  # every run seeds torch itself (build, TrainConfig)
        print(f"done {job_name(job)}", flush=True)
        return result

    harness.run_jobs(jobs, log, one, workers=workers)


def accuracy_mode(args) -> None:
    backbone = BACKBONES[args.backbone]
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = harness.RunLog(args.jsonl, identity=run_identity)
    if args.in_process and args.workers != 1:
        raise SystemExit("--in-process runs one job at a time: pass --workers 1")
    options = dict(backbone=backbone, in_process=args.in_process)
    run_jobs(tuning_jobs(backbone), log, work_dir, args.workers, **options)
    while extra := log.pending(extension_jobs(log.records(), backbone)):
        run_jobs(extra, log, work_dir, args.workers, **options)
    run_jobs(final_jobs(log.records(), backbone), log, work_dir, args.workers, **options)


def one_mode(args) -> None:
    harness.emit(run(json.loads(args.job), Path(args.work_dir), BACKBONES[args.backbone]))


# --- timing -------------------------------------------------------------------------------------------------
def timing_mode(args) -> None:
    """Median whole-step time (forward, backward, optimizer, allocator) per method, alternated step by step."""
    torch.set_num_threads(args.threads)
    task, _ = task_data()
    batch = trimmed(task.collate([task.train[i] for i in range(MINILM.batch)]))
    rows = []
    for budget in BUDGETS:
        for phase in ("allocating", "after"):
            rows.append(_time_phase(task, batch, budget, phase, args.steps))
    payload = {"date": _date(), "machine": _machine(args.threads), "batch": MINILM.batch, "rows": rows,
               "environment": harness.environment(threads=args.threads)}
    harness.write_json(args.timing_json, payload)
    print(json.dumps(rows, indent=1))


def _time_phase(task, batch: dict, budget: int, phase: str, steps: int) -> dict:
    """`allocating`: allocators built for a long run, timed while they act every step (AdaLoRA's cubic phase,
    IncreLoRA's growth with its ∂L/∂ΔW probe, TriAdaptLoRA's events, CoLoRA's contribution measure);
    `after`: the same allocators once allocation is over (AdaLoRA re-applies its pattern; the others are idle).
    Each step is timed whole; the allocator's own share is timed too."""
    contenders = {}
    for method in ADAPTERS:
        config = method_config(method, budget)
        if method == "increlora":  # one module per event, so growth (and its probe) lasts through the timing
            config = dataclasses.replace(config, top_modules=1)
        model, config = build(method, budget, 0, task, config)
        allocator = config.allocator(model, 10_000) if method != "lora" else None
        if allocator is not None and phase == "after":
            _finish(allocator, method)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        contenders[method] = [model, allocator, optimizer, _start_step(method, phase)]
    times = {m: [] for m in contenders}
    allocator_times = {m: [] for m in contenders}
    for repeat in range(steps + 2):
        for method, state in contenders.items():
            elapsed, in_allocator = _one_step(state, batch, phase)
            if repeat >= 2:
                times[method].append(elapsed)
                allocator_times[method].append(in_allocator)
    medians = {m: statistics.median(t) for m, t in times.items()}
    allocator_share = {m: statistics.median(a) / medians[m] for m, a in allocator_times.items()}
    return {"budget": budget, "phase": phase, "median_seconds": medians,
            "ratio_to_lora": {m: medians[m] / medians["lora"] for m in medians}, "allocator_share": allocator_share,
            "raw_seconds": times, "raw_allocator_seconds": allocator_times}


def _finish(allocator, method: str) -> None:
    """Put an allocator in its post-allocation state (what it is after its schedule ran)."""
    if method == "adalora":
        allocator.pattern_fixed = True
    elif method == "colora":
        allocator.allocated = True
    else:
        allocator._finish()


def _start_step(method: str, phase: str) -> int:
    if phase == "after":
        return 9_999
    return {"adalora": 2000, "increlora": 10}.get(method, 1)


def _one_step(state: list, batch: dict, phase: str) -> tuple[float, float]:
    import deltatune as dt

    model, allocator, optimizer, step = state
    started = time.perf_counter()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = F.cross_entropy(logits, batch["labels"]) + dt.regularization_loss(model)
    loss.backward()
    optimizer.step()
    allocator_started = time.perf_counter()
    if allocator is not None:
        allocator.step(model, step)
    in_allocator = time.perf_counter() - allocator_started
    optimizer.zero_grad(set_to_none=True)
    state[3] = step + 1 if phase == "allocating" else step
    return time.perf_counter() - started, in_allocator


# --- peft comparison ----------------------------------------------------------------------------------------
def peft_mode(args) -> None:
    """Same MiniLM, same targets, same init_r/target_r/schedule/seed and the same batches through peft's AdaLoRA
    and ours (both with the official code-form regularizer, γ 0.5 as peft's default); final per-layer ranks."""
    from peft import AdaLoraConfig, get_peft_model

    import deltatune as dt

    torch.set_num_threads(args.threads)
    task, _ = task_data()
    steps, ti, tf = args.peft_steps, args.peft_steps // 10, args.peft_steps // 2
    results = {}
    for name in ("peft", "deltatune"):
        torch.manual_seed(0)
        model = task.build_model()
        if name == "peft":
            config = AdaLoraConfig(target_modules=MINILM.targets, init_r=12, target_r=8, tinit=ti, tfinal=tf, deltaT=2,
                                   total_step=steps, lora_alpha=12, orth_reg_weight=0.5, modules_to_save=["classifier"])
            model = get_peft_model(model, config)
        else:
            config = dt.config_for("adalora", targets=MINILM.targets, extra_trainable=("classifier",), init_rank=12,
                                   target_rank=8, alpha=12.0, initial_warmup=ti, final_warmup=tf, mask_interval=2,
                                   orthogonal_weight=0.5, orthogonal_form="code")
            model = dt.adapt(model, config)
            allocator = config.allocator(model, steps)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for step in range(1, steps + 1):
            index = torch.randint(0, len(task.train), (MINILM.batch,), generator=generator).tolist()
            batch = trimmed(task.collate([task.train[i] for i in index]))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = F.cross_entropy(logits, batch["labels"]) + _regularizer(model, name)
            loss.backward()
            optimizer.step()
            if name == "peft":
                model.base_model.update_and_allocate(step)
            else:
                allocator.step(model, step)
            optimizer.zero_grad()
        results[name] = _final_ranks(model, name)
    payload = {"date": _date(), "machine": _machine(args.threads), "steps": steps, "ranks": results,
               "environment": harness.environment(threads=args.threads)}
    harness.write_json(args.peft_json, payload)
    print(json.dumps(payload, indent=1))


def _regularizer(model: nn.Module, name: str):
    import deltatune as dt

    if name == "deltatune":
        return dt.regularization_loss(model)
    # peft adds its regularizer only to a model output with `.loss`; ours returns logits: the same formula here
    terms = [torch.linalg.matrix_norm(p @ p.T - torch.eye(p.shape[0]) if "lora_A" in n
                                      else p.T @ p - torch.eye(p.shape[1]))
             for n, p in model.named_parameters() if ("lora_A" in n or "lora_B" in n) and p.requires_grad]
    return 0.5 * torch.stack(terms).mean()


def _final_ranks(model: nn.Module, name: str) -> dict[str, int]:
    from deltatune.allocate import describe_allocation

    if name == "deltatune":
        return {p: m["rank"] for p, m in describe_allocation(model)["default"]["modules"].items()}
    ranks = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_E") and "default" in getattr(module, "lora_E", {}):
            ranks[path] = int((module.lora_E["default"].detach().reshape(-1) != 0).sum())
    return ranks


# --- report -------------------------------------------------------------------------------------------------
def _final_records(records: list[dict], backbone: Backbone = MINILM) -> list[dict]:
    """One test record per (method, budget, seed) at the rate chosen for that budget (a tuning run wins over an
    older final run of the same settings: the later record is kept)."""
    done = {(r["method"], r["budget"]) for r in records if "test" in r}
    chosen = {(m, b): chosen_lr(records, m, b, backbone) for m, b in done
              if (m == "full" and len(backbone.full_lrs) == 1) or _tuning_records(records, m, b)}
    final: dict[tuple, dict] = {}
    for r in records:
        if "test" in r and r["lr"] == chosen.get((r["method"], r["budget"])) and (
                r["method"] == "full" or r["budget"] in backbone.budgets):
            final[r["method"], r["budget"], r["seed"]] = r
    return list(final.values())


def _tuning_table(records: list[dict], budget: int, backbone: Backbone = MINILM) -> list[str]:
    """Validation accuracy per rate; the chosen rate is starred and marked when it is an edge of the rates that
    method tried (its lowest, or its highest after the extension rule)."""
    methods = ADAPTERS if budget else ("full",)
    grid = (*LR_GRID, *LR_EXTENSION) if budget else backbone.full_lrs
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
             "| --- |" + " --- |" * (len(grid) + 1)]
    for method in methods:
        tuned = {r["lr"]: r["validation"] for r in _tuning_records(records, method, budget)}
        if not tuned:
            lines.append(f"| {method} | " + " | ".join("–" for _ in grid) + " | – |")
            continue
        best = chosen_lr(records, method, budget, backbone)
        edge = best in (min(tuned), max(tuned))
        cells = [f"{100 * tuned[lr]:.2f}{'*' if edge and lr == best else ''}" if lr in tuned else "–" for lr in grid]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {best:g}{'* (grid edge)' if edge else ''} |")
    return lines


def _accuracy_table(records: list[dict], backbone: Backbone = MINILM) -> list[str]:
    final = _final_records(records, backbone)
    lines = ["| method | budget | seeds | test accuracy % (mean ± std) | Δ vs LoRA (pts) | live trainable (adapter) |"
             " train s (mean) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for budget in (*backbone.budgets, 0):
        lora = [r["test"] for r in final if r["method"] == "lora" and r["budget"] == budget]
        for method in (METHODS if budget else ("full",)):
            rows = [r for r in final if r["method"] == method and (r["budget"] == budget or method == "full")]
            if method == "full" and budget:
                continue
            if not rows:
                continue
            tests = [r["test"] for r in rows]
            delta = (f"{100 * (statistics.mean(tests) - statistics.mean(lora)):+.2f}"
                     if lora and method not in ("lora", "full") else "")
            live = int(statistics.mean(r["live_parameters"] for r in rows))
            seconds = statistics.mean(r["train_seconds"] for r in rows)
            label = "full" if method == "full" else str(budget)
            lines.append(f"| {method} | {label} | {len(rows)} | {mean_std(tests, digits=2)} | {delta} | {live:,} |"
                         f" {seconds:.0f} |")
    return lines


def _module_kind(path: str, backbone: Backbone = MINILM) -> str:
    for part, label in backbone.kinds:
        if part in path:
            return label
    return path


def _layer_of(path: str) -> int:
    match = re.search(r"\.layers?\.(\d+)\.", path)
    if match is None:
        raise ValueError(f"no layer index in module path {path!r}")
    return int(match.group(1))


def _rank_profile(records: list[dict], budget: int, backbone: Backbone = MINILM) -> list[str]:
    """Mean final rank per module kind and per layer, over seeds (adaptive methods)."""
    kinds = tuple(label for _, label in backbone.kinds)
    lines = ["| method | " + " | ".join(kinds) + f" | layers 0–{backbone.layers - 1} (mean rank) |",
             "| --- |" + " --- |" * (len(kinds) + 1)]
    for method in ADAPTERS[1:]:
        rows = [r for r in _final_records(records, backbone)
                if r["method"] == method and r["budget"] == budget and "ranks" in r]
        if not rows:
            continue
        by_kind: dict[str, list[int]] = {k: [] for k in kinds}
        by_layer: dict[int, list[int]] = {}
        for row in rows:
            for path, rank in row["ranks"].items():
                by_kind[_module_kind(path, backbone)].append(rank)
                by_layer.setdefault(_layer_of(path), []).append(rank)
        cells = [f"{statistics.mean(v):.1f}" if v else "–" for v in by_kind.values()]
        layers = " / ".join(f"{statistics.mean(by_layer[k]):.1f}" for k in sorted(by_layer))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {layers} |")
    return lines


def _beside(columns: list[tuple[Backbone, list[dict]]], budgets: tuple[int, ...]) -> list[str]:
    """Each method's test accuracy and its gap to LoRA at each budget, one column pair per backbone (recipe)."""
    finals = [(backbone, _final_records(records, backbone)) for backbone, records in columns]

    def cell(final: list[dict], method: str, budget: int) -> str:
        tests = [r["test"] for r in final if r["method"] == method and r["budget"] == budget]
        lora = [r["test"] for r in final if r["method"] == "lora" and r["budget"] == budget]
        if not tests:
            return "– | –"
        delta = f"{100 * (statistics.mean(tests) - statistics.mean(lora)):+.2f}" if lora and method != "lora" else ""
        return f"{mean_std(tests, digits=2)} | {delta}"

    lines = ["| method | budget | " + " | ".join(f"{b.name} ({b.steps} steps) test % | Δ vs LoRA" for b, _ in finals)
             + " |", "| --- | --- |" + " --- | --- |" * len(finals)]
    for budget in budgets:
        for method in ADAPTERS:
            lines.append(f"| {method} | {budget} | " + " | ".join(cell(f, method, budget) for _, f in finals) + " |")
    lines.append("| full | full | " + " | ".join(cell(f, "full", 0) for _, f in finals) + " |")
    return lines


def _timing_table(payload: dict) -> list[str]:
    lines = [f"{payload['machine']}; batch {payload['batch']}; "
             f"median of {len(payload['rows'][0]['raw_seconds']['lora'])} whole steps per contender, "
             "alternated step by step. Cell: step time / LoRA's (median step ms; allocator.step share of the step).",
             "",
             "| budget | phase | " + " | ".join(ADAPTERS) + " |", "| --- | --- |" + " --- |" * len(ADAPTERS)]
    for row in payload["rows"]:
        ratios = " | ".join(f"{row['ratio_to_lora'][m]:.3f} ({1000 * row['median_seconds'][m]:.0f} ms; "
                            f"{100 * row['allocator_share'][m]:.1f}%)" for m in ADAPTERS)
        lines.append(f"| {row['budget']} | {row['phase']} | {ratios} |")
    return lines


def _peft_lines(payload: dict) -> list[str]:
    ranks = payload["ranks"]
    theirs = {p.replace("base_model.model.", ""): r for p, r in ranks["peft"].items()}
    ours = ranks["deltatune"]
    common = sorted(set(theirs) & set(ours))
    kinds = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")
    lines = ["| | total rank | " + " | ".join(kinds) + " | layers 0–5 |", "| --- | --- |" + " --- |" * (len(kinds) + 1)]
    for name, table in (("peft", theirs), ("deltatune", ours)):
        kind_sum = {k: sum(table[p] for p in common if _module_kind(p) == k) for k in kinds}
        layers = " / ".join(str(sum(table[p] for p in common if f"layer.{i}." in p)) for i in range(6))
        lines.append(f"| {name} | {sum(table[p] for p in common)} | " + " | ".join(str(v) for v in kind_sum.values())
                     + f" | {layers} |")
    correlation = _spearman([theirs[p] for p in common], [ours[p] for p in common])
    same = sum(theirs[p] == ours[p] for p in common)
    lines += ["", f"Per-module agreement: {same}/{len(common)} modules get the same rank; Spearman correlation of the "
              f"36 per-module ranks: {correlation:.2f}."]
    return lines


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def _plots(records: list[dict], out_dir: Path, backbone: Backbone = MINILM) -> list[str]:
    from deltatune.allocate.plots import plot_rank_heatmap, plot_schedule

    written = []
    for method in ADAPTERS[1:]:
        for budget in backbone.budgets:
            rows = [r for r in _final_records(records, backbone) if r["method"] == method and r["budget"] == budget
                    and r["seed"] == 0 and "ranks" in r]
            if rows:
                short = {re.sub(r"^backbone\.(encoder\.)?", "", p): v for p, v in rows[0]["ranks"].items()}
                path = out_dir / f"{backbone.stem}_{method}_r{budget}.png"
                plot_rank_heatmap(short, path, title=f"{method}, final ranks, budget {budget}/module, seed 0")
                written.append(path.name)
    plotted = SCHEDULE_PLOT_BUDGET if SCHEDULE_PLOT_BUDGET in backbone.budgets else backbone.budgets[-1]
    for method, schedule in _schedules(plotted, backbone).items():
        path = out_dir / f"{backbone.stem}_schedule_{method}.png"
        plot_schedule(schedule, backbone.steps, path)
        written.append(path.name)
    return written


def _schedules(budget: int, backbone: Backbone = MINILM) -> dict:
    from deltatune.allocate.schedules import CubicBudgetSchedule, LinearGrowthSchedule, ThresholdGrowthSchedule

    modules, steps = backbone.modules, backbone.steps
    ada = method_config("adalora", budget, backbone)
    inc = method_config("increlora", budget, backbone)
    tri = method_config("triadaptlora", budget, backbone)
    return {
        "adalora": CubicBudgetSchedule(ada.init_rank * modules, budget * modules, steps, int(0.1 * steps),
                                       int(0.5 * steps), ada.mask_interval),
        "increlora": LinearGrowthSchedule(modules, budget * modules, steps, modules, inc.step_size,
                                          inc.initial_warmup, inc.interval, top_modules=inc.top_modules),
        "triadaptlora": ThresholdGrowthSchedule(modules, budget * modules, steps, modules, tri.step_size, 0, 1,
                                                rule="linear"),
    }


def report_mode(args) -> None:
    backbone = BACKBONES[args.backbone]
    records = harness.RunLog(args.jsonl, identity=run_identity).records()
    env = harness.environment(threads=1)
    workers = "2 runs at a time" if backbone is MINILM else "1 run at a time (--workers 1, under the heavy lock)"
    lines = [
        f"# Budget-adaptive low rank vs LoRA and full fine-tuning ({backbone.title})", "",
        f"Date: {env['date'][:10]}. Machine: {_machine(1)} per run, {workers}; other jobs shared the cores.",
        "", "Command:", "", *[f"    {command}" for command in backbone_commands(backbone)], "",
        backbone_setup(backbone), "",
        "## Test accuracy", "", *_accuracy_table(records, backbone), "",
    ]
    if backbone is not MINILM and args.minilm_jsonl.exists():
        columns = [(MINILM, harness.RunLog(args.minilm_jsonl, identity=run_identity).records())]
        for other in BACKBONES.values():  # the other recipes' committed records, this one's from --jsonl
            path = args.jsonl if other is backbone else RESULTS / f"{other.stem}.jsonl"
            if other is not MINILM and path.exists():
                columns.append((other, records if other is backbone else
                                harness.RunLog(path, identity=run_identity).records()))
        lines += [f"## Beside MiniLM (`{args.minilm_jsonl.name}`) and the other recipes", "",
                  *_beside(columns, backbone.budgets), ""]
    for budget in backbone.budgets:
        lines += [f"## Learning-rate tuning (validation accuracy %, seed 0, budget {budget})", "",
                  *_tuning_table(records, budget, backbone), ""]
    if len(backbone.full_lrs) > 1:
        lines += ["## Learning-rate tuning of full fine-tuning (validation accuracy %, seed 0)", "",
                  *_tuning_table(records, 0, backbone), ""]
    for budget in backbone.budgets:
        lines += [f"## Where the rank went (mean final rank per module kind / per layer, budget {budget})", "",
                  *_rank_profile(records, budget, backbone), ""]
    if backbone is MINILM and args.timing_json.exists():
        lines += ["## Step time vs LoRA (ratio of medians, side by side)", "",
                  *_timing_table(json.loads(args.timing_json.read_text())), ""]
    if backbone is MINILM and args.peft_json.exists():
        lines += ["## AdaLoRA vs peft's AdaLoRA (same config, seed and batches; final ranks)", "",
                  *_peft_lines(json.loads(args.peft_json.read_text())), ""]
    plots = _plots(records, args.out_dir, backbone)  # written (atomically) before the table that shows them
    lines += ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""]
    output = args.out_dir / f"{backbone.stem}.md"
    report = "\n".join(lines) + harness.kept_notes(output)
    harness.write_report(output, report)
    print(report)


def backbone_commands(backbone: Backbone) -> list[str]:
    prefix = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py"
    if backbone is MINILM:
        return [f"{prefix} accuracy --workers 2", f"{prefix} timing", f"{prefix} peft", f"{prefix} report"]
    return [f"flock /work/wt/heavy.lock env {prefix} accuracy --backbone {backbone.name} --workers 1 --in-process",
            f"{prefix} report --backbone {backbone.name}"]


def backbone_setup(backbone: Backbone) -> str:
    if backbone is MINILM:
        return ("Setup: see the docstring of `benchmarks/adaptive_rank.py` (1,000 training glosses, 2 epochs = 64 "
                "steps, 36 encoder Linear layers, budgets = average final rank 2 and 8 per module, scale-matched "
                "alpha, learning rate tuned per method on validation at every budget with seed 0). Raw records: "
                "`adaptive_rank.jsonl`.")
    subset = "the whole training split" if backbone.train_size is None else "a label-stratified subset (seed 0)"
    budgets = " and ".join(str(b) for b in backbone.budgets)
    return (f"Setup: see the docstring of `benchmarks/adaptive_rank.py` (`{backbone.task}`: {subset}, "
            f"{backbone.train_examples:,} images, {backbone.epochs} epoch(s) of batch {backbone.batch} = "
            f"{backbone.steps} steps; {backbone.modules} Linear layers of the {backbone.layers} blocks; budgets = "
            f"average final rank {budgets} per module, scale-matched alpha, schedules scaled to the run's length; "
            "learning rate tuned per method on validation at every budget with seed 0, full fine-tuning's on "
            f"{{{', '.join(f'{lr:g}' for lr in backbone.full_lrs)}}}). Validation: the whole split; test: the "
            f"whole split. Raw records: `{backbone.stem}.jsonl`.")


def _date() -> str:
    return harness.environment()["date"][:10]


def _machine(threads: int) -> str:
    env = harness.environment(threads=threads)
    return f"{env['cores']} cores (shared), torch {env['torch']}, {env['threads']} thread(s), {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("accuracy", "one", "timing", "peft", "report"))
    parser.add_argument("job", nargs="?")
    parser.add_argument("--backbone", choices=tuple(BACKBONES), default="minilm",
                        help="the task and model (timing and peft: minilm only)")
    parser.add_argument("--jsonl", type=Path, default=None, help="default: results/<the backbone's stem>.jsonl")
    parser.add_argument("--minilm-jsonl", type=Path, default=RESULTS / "adaptive_rank.jsonl",
                        help="report of another backbone: the MiniLM records it is set beside")
    parser.add_argument("--timing-json", type=Path, default=RESULTS / "adaptive_rank_timing.json")
    parser.add_argument("--peft-json", type=Path, default=RESULTS / "adaptive_rank_peft.json")
    parser.add_argument("--work-dir", default=None, help="default: <tmp>/<the backbone's stem>_runs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where `report` writes the table and plots")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-process", action="store_true",
                        help="accuracy: run the jobs in this process, one at a time, instead of a child process "
                             "each (saves the child's start-up, ~45 s on a loaded machine)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peft-steps", type=int, default=MINILM.steps)
    args = parser.parse_args()
    stem = BACKBONES[args.backbone].stem
    args.jsonl = args.jsonl or RESULTS / f"{stem}.jsonl"
    args.work_dir = args.work_dir or str(Path(tempfile.gettempdir()) / f"{stem}_runs")
    if args.mode in ("timing", "peft") and args.backbone != "minilm":
        parser.error(f"mode {args.mode!r} runs on MiniLM only; drop --backbone {args.backbone}")
    if args.mode == "accuracy":
        accuracy_mode(args)
    elif args.mode == "one":
        one_mode(args)
    elif args.mode == "timing":
        timing_mode(args)
    elif args.mode == "peft":
        peft_mode(args)
    else:
        report_mode(args)


if __name__ == "__main__":
    main()

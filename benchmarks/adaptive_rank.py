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

Modes:
    accuracy  the table above (a fresh child process per run, `--workers` at a time, resumable: finished runs are
              appended to the JSONL file and skipped by a re-run; the loop is deltatune.bench.harness's)
    timing    step time of each method vs LoRA, side by side (A B A B ...), during allocation and after it
    peft      AdaLoRA vs peft's AdaLoRA on MiniLM: same config, seed and batches -> final per-layer ranks
    report    write the Markdown table and the rank heat maps from the JSONL and JSON files (no training)

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py accuracy --workers 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py timing
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py peft
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py report
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
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
TASK, TRAIN_SIZE, VALIDATION_SIZE, EPOCHS, BATCH, MAX_LENGTH = "wordnet-nouns", 1000, 500, 2, 32, 32
STEPS = EPOCHS * -(-TRAIN_SIZE // BATCH)
TEST_SIZE = None  # the whole test split
if os.environ.get("ADAPTIVE_RANK_SMOKE"):  # a few-minute end-to-end check of the script itself
    TRAIN_SIZE, VALIDATION_SIZE, EPOCHS, TEST_SIZE = 800, 64, 1, 100
    STEPS = EPOCHS * -(-TRAIN_SIZE // BATCH)
TARGETS = (r"backbone\.encoder\.layer\.\d+\."
           r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)")
ADAPTERS = ("lora", "adalora", "increlora", "triadaptlora", "colora")
METHODS = (*ADAPTERS, "full")
BUDGETS = (2, 8)
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
LR_EXTENSION = (1e-1, 3e-1)  # tried in turn for a method while its best rate is the highest one tried
FULL_LR = 5e-5
SEEDS = (0, 1, 2)
SCHEDULE_PLOT_BUDGET = 8  # the budget whose allocation schedules are plotted


# --- data ---------------------------------------------------------------------------------------------------
def task_data():
    from deltatune.data import load_task
    from deltatune.data.sampling import stratified_subset

    task = load_task(TASK, train_size=TRAIN_SIZE, seed=0, max_length=MAX_LENGTH)
    validation = task.validation.subset(stratified_subset(task.validation.labels.tolist(), VALIDATION_SIZE, 0))
    if TEST_SIZE is not None:
        test = task.test.subset(stratified_subset(task.test.labels.tolist(), TEST_SIZE, 0))
        task = dataclasses.replace(task, test=test)
    return task, validation


def trimmed(batch: dict) -> dict:
    """Drop padding columns beyond the longest sequence of the batch (attention-masked, so outputs are equal)."""
    length = int(batch["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :length] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}


def trimming_collate(task):
    return lambda items: trimmed(task.collate(items))


@torch.no_grad()
def accuracy(model: nn.Module, dataset, task, batch_size: int = 64) -> float:
    """Test accuracy with length-sorted, trimmed batches (same predictions, less padding)."""
    model.eval()
    lengths = torch.stack([dataset[i]["attention_mask"].sum() for i in range(len(dataset))])
    order = torch.argsort(lengths, stable=True).tolist()
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = trimmed(task.collate([dataset[i] for i in order[start:start + batch_size]]))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    model.train()
    return correct / len(dataset)


# --- methods ------------------------------------------------------------------------------------------------
def method_config(method: str, budget: int):
    """The benchmark's config of each method at a budget (average final rank per module)."""
    import deltatune as dt

    common = dict(targets=TARGETS, extra_trainable=("classifier",))
    if method == "lora":
        return dt.config_for("lora", rank=budget, alpha=float(budget), **common)
    if method == "adalora":
        init = {2: 4, 8: 12}.get(budget, budget * 3 // 2)  # the paper's initial ranks for final 2 / 8 (App. C)
        # t_i 10%, t_f 50% of training (defaults); ΔT = 2 in a 64-step run (the paper uses ΔT = 1 on short RTE)
        return dt.config_for("adalora", init_rank=init, target_rank=budget, alpha=float(init), mask_interval=2,
                             **common)
    if method == "increlora":
        top = {2: 2, 8: 6}.get(budget, 2)  # the official scripts' top_h for target ranks 2 and 8
        return dt.config_for("increlora", init_rank=1, target_rank=budget, alpha=float(budget), top_modules=top,
                             initial_warmup=3, interval=1, restart_warmup=2, **common)
    if method == "triadaptlora":
        return dt.config_for("triadaptlora", init_rank=1, target_rank=budget, alpha=float(budget), **common)
    if method == "colora":
        return dt.config_for("colora", rank=budget, alpha=float(budget), probe=0.25, **common)
    raise ValueError(method)


def build(method: str, budget: int, seed: int, task, config=None):
    import deltatune as dt

    torch.manual_seed(seed)
    model = task.build_model()
    if method == "full":
        model.requires_grad_(True)
        for parameter in model.backbone.pooler.parameters():  # unused by mean pooling
            parameter.requires_grad_(False)
        return model, None
    config = config or method_config(method, budget)
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


def run(job: dict, work_dir: Path) -> dict:
    """Train one (method, budget, seed, lr) and evaluate; saves the adapter for the heat maps."""
    import deltatune as dt
    from deltatune.allocate import describe_allocation
    from deltatune.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    task, validation = task_data()
    model, config = build(job["method"], job["budget"], job["seed"], task)
    callbacks = config.training_callbacks(model, STEPS) if config is not None else []
    settings = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=job["lr"], seed=job["seed"], progress=False,
                           eval_every_epoch=False)
    trainer = Trainer(model, settings, task.train, collate_fn=trimming_collate(task), callbacks=callbacks)
    started = time.perf_counter()
    trainer.train()
    result = dict(job, train_seconds=time.perf_counter() - started, steps=trainer.global_step,
                  live_parameters=live_parameters(model, job["method"]))
    if job.get("validation"):
        result["validation"] = accuracy(model, validation, task)
    if job.get("test"):
        result["test"] = accuracy(model, task.test, task)
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


def tuning_jobs() -> list[dict]:
    """Every method's rate is tuned at every budget it is compared at (seed 0, validation)."""
    return [dict(method=m, budget=budget, seed=0, lr=lr, validation=True, test=True)
            for budget in BUDGETS for m in ADAPTERS for lr in LR_GRID]


def _tuning_records(records: list[dict], method: str, budget: int) -> list[dict]:
    return [r for r in records if r["method"] == method and r["budget"] == budget and r["seed"] == 0
            and isinstance(r.get("validation"), float)]


def extension_jobs(records: list[dict]) -> list[dict]:
    """The next rate above the grid for every (method, budget) whose best rate so far is the highest it tried."""
    jobs = []
    for budget in BUDGETS:
        for method in ADAPTERS:
            tried = sorted(r["lr"] for r in _tuning_records(records, method, budget))
            if not tried or chosen_lr(records, method, budget) != tried[-1]:
                continue
            higher = [lr for lr in LR_EXTENSION if lr > tried[-1]]
            if higher:
                jobs.append(dict(method=method, budget=budget, seed=0, lr=higher[0], validation=True, test=True))
    return jobs


def chosen_lr(records: list[dict], method: str, budget: int) -> float:
    """The best validation rate of `method` at `budget` (ties to the smaller rate); full: the recipe's rate."""
    if method == "full":
        return FULL_LR
    return max(_tuning_records(records, method, budget), key=lambda r: (r["validation"], -r["lr"]))["lr"]


def final_jobs(records: list[dict]) -> list[dict]:
    jobs = []
    for seed in SEEDS:
        for budget in BUDGETS:
            for method in ADAPTERS:
                if seed != 0:  # seed 0 is the tuning run at the chosen rate
                    jobs.append(dict(method=method, budget=budget, seed=seed, lr=chosen_lr(records, method, budget),
                                     test=True))
        jobs.append(dict(method="full", budget=0, seed=seed, lr=FULL_LR, test=True))
    return jobs


def run_child(job: dict, work_dir: Path) -> dict:
    command = harness.script_command(__file__, "one", json.dumps(job), "--work-dir", str(work_dir))
    result = harness.run_child(command, label=f"run {job_name(job)}")
    print(f"done {job_name(job)}", flush=True)
    return result


def run_jobs(jobs: list[dict], log: harness.RunLog, work_dir: Path, workers: int) -> None:
    harness.run_jobs(jobs, log, lambda job: run_child(job, work_dir), workers=workers)


def accuracy_mode(args) -> None:
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = harness.RunLog(args.jsonl, identity=run_identity)
    run_jobs(tuning_jobs(), log, work_dir, args.workers)
    while extra := log.pending(extension_jobs(log.records())):
        run_jobs(extra, log, work_dir, args.workers)
    run_jobs(final_jobs(log.records()), log, work_dir, args.workers)


def one_mode(args) -> None:
    harness.emit(run(json.loads(args.job), Path(args.work_dir)))


# --- timing -------------------------------------------------------------------------------------------------
def timing_mode(args) -> None:
    """Median whole-step time (forward, backward, optimizer, allocator) per method, alternated step by step."""
    torch.set_num_threads(args.threads)
    task, _ = task_data()
    batch = trimmed(task.collate([task.train[i] for i in range(BATCH)]))
    rows = []
    for budget in BUDGETS:
        for phase in ("allocating", "after"):
            rows.append(_time_phase(task, batch, budget, phase, args.steps))
    payload = {"date": _date(), "machine": _machine(args.threads), "batch": BATCH, "rows": rows,
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
            config = AdaLoraConfig(target_modules=TARGETS, init_r=12, target_r=8, tinit=ti, tfinal=tf, deltaT=2,
                                   total_step=steps, lora_alpha=12, orth_reg_weight=0.5, modules_to_save=["classifier"])
            model = get_peft_model(model, config)
        else:
            config = dt.config_for("adalora", targets=TARGETS, extra_trainable=("classifier",), init_rank=12,
                                   target_rank=8, alpha=12.0, initial_warmup=ti, final_warmup=tf, mask_interval=2,
                                   orthogonal_weight=0.5, orthogonal_form="code")
            model = dt.adapt(model, config)
            allocator = config.allocator(model, steps)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        for step in range(1, steps + 1):
            index = torch.randint(0, len(task.train), (BATCH,), generator=generator).tolist()
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
def _final_records(records: list[dict]) -> list[dict]:
    """One test record per (method, budget, seed) at the rate chosen for that budget (a tuning run wins over an
    older final run of the same settings: the later record is kept)."""
    done = {(r["method"], r["budget"]) for r in records if "test" in r}
    chosen = {(m, b): chosen_lr(records, m, b) for m, b in done if m == "full" or _tuning_records(records, m, b)}
    final: dict[tuple, dict] = {}
    for r in records:
        if "test" in r and r["lr"] == chosen.get((r["method"], r["budget"])) and (
                r["method"] == "full" or r["budget"] in BUDGETS):
            final[r["method"], r["budget"], r["seed"]] = r
    return list(final.values())


def _tuning_table(records: list[dict], budget: int) -> list[str]:
    grid = (*LR_GRID, *LR_EXTENSION)
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
             "| --- |" + " --- |" * (len(grid) + 1)]
    for method in ADAPTERS:
        tuned = {r["lr"]: r["validation"] for r in _tuning_records(records, method, budget)}
        cells = [f"{100 * tuned[lr]:.2f}" if lr in tuned else "–" for lr in grid]
        edge = " (grid edge)" if tuned and chosen_lr(records, method, budget) == max(tuned) else ""
        chosen = f"{chosen_lr(records, method, budget):g}{edge}" if tuned else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {chosen} |")
    return lines


def _accuracy_table(records: list[dict]) -> list[str]:
    final = _final_records(records)
    lines = ["| method | budget | seeds | test accuracy % (mean ± std) | Δ vs LoRA (pts) | live trainable (adapter) |"
             " train s (mean) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for budget in (*BUDGETS, 0):
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


def _module_kind(path: str) -> str:
    for kind in ("query", "key", "value", "attention.output", "intermediate", "output"):
        if kind in path:
            return {"attention.output": "attn.out", "output": "ffn.out", "intermediate": "ffn.in"}.get(kind, kind)
    return path


def _rank_profile(records: list[dict], budget: int) -> list[str]:
    """Mean final rank per module kind and per layer, over seeds (adaptive methods)."""
    kinds = ("query", "key", "value", "attn.out", "ffn.in", "ffn.out")
    lines = ["| method | " + " | ".join(kinds) + " | layers 0–5 (mean rank) |", "| --- |" + " --- |" * (len(kinds) + 1)]
    for method in ADAPTERS[1:]:
        rows = [r for r in _final_records(records) if r["method"] == method and r["budget"] == budget and "ranks" in r]
        if not rows:
            continue
        by_kind = {k: [] for k in kinds}
        by_layer: dict[int, list[int]] = {}
        for row in rows:
            for path, rank in row["ranks"].items():
                by_kind[_module_kind(path)].append(rank)
                layer = int(path.split("layer.")[1].split(".")[0])
                by_layer.setdefault(layer, []).append(rank)
        cells = [f"{statistics.mean(v):.1f}" if v else "–" for v in by_kind.values()]
        layers = " / ".join(f"{statistics.mean(by_layer[k]):.1f}" for k in sorted(by_layer))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {layers} |")
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


def _plots(records: list[dict], out_dir: Path) -> list[str]:
    from deltatune.allocate.plots import plot_rank_heatmap, plot_schedule

    written = []
    for method in ADAPTERS[1:]:
        for budget in BUDGETS:
            rows = [r for r in _final_records(records) if r["method"] == method and r["budget"] == budget
                    and r["seed"] == 0 and "ranks" in r]
            if rows:
                short = {p.replace("backbone.encoder.", ""): v for p, v in rows[0]["ranks"].items()}
                path = out_dir / f"adaptive_rank_{method}_r{budget}.png"
                plot_rank_heatmap(short, path, title=f"{method}, final ranks, budget {budget}/module, seed 0")
                written.append(path.name)
    for method, schedule in _schedules(SCHEDULE_PLOT_BUDGET).items():
        path = out_dir / f"adaptive_rank_schedule_{method}.png"
        plot_schedule(schedule, STEPS, path)
        written.append(path.name)
    return written


def _schedules(budget: int) -> dict:
    from deltatune.allocate.schedules import CubicBudgetSchedule, LinearGrowthSchedule, ThresholdGrowthSchedule

    modules = 36
    ada = method_config("adalora", budget)
    inc = method_config("increlora", budget)
    tri = method_config("triadaptlora", budget)
    return {
        "adalora": CubicBudgetSchedule(ada.init_rank * modules, budget * modules, STEPS, int(0.1 * STEPS),
                                       int(0.5 * STEPS), ada.mask_interval),
        "increlora": LinearGrowthSchedule(modules, budget * modules, STEPS, modules, inc.step_size, 3, 1,
                                          top_modules=inc.top_modules),
        "triadaptlora": ThresholdGrowthSchedule(modules, budget * modules, STEPS, modules, tri.step_size, 0, 1,
                                                rule="linear"),
    }


def report_mode(args) -> None:
    records = harness.RunLog(args.jsonl, identity=run_identity).records()
    env = harness.environment(threads=1)
    lines = [
        "# Budget-adaptive low rank vs LoRA and full fine-tuning (wordnet-nouns, MiniLM)", "",
        f"Date: {env['date'][:10]}. Machine: {_machine(1)} per run, 2 runs at a time; other jobs shared the cores.",
        "",
        "Command:", "", "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py accuracy --workers 2",
        "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py timing",
        "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py peft",
        "    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/adaptive_rank.py report", "",
        "Setup: see the docstring of `benchmarks/adaptive_rank.py` (1,000 training glosses, 2 epochs = 64 steps, 36 "
        "encoder Linear layers, budgets = average final rank 2 and 8 per module, scale-matched alpha, learning "
        "rate tuned per method on validation at every budget with seed 0). Raw records: `adaptive_rank.jsonl`.", "",
        "## Test accuracy", "", *_accuracy_table(records), "",
    ]
    for budget in BUDGETS:
        lines += [f"## Learning-rate tuning (validation accuracy %, seed 0, budget {budget})", "",
                  *_tuning_table(records, budget), ""]
    for budget in BUDGETS:
        lines += [f"## Where the rank went (mean final rank per module kind / per layer, budget {budget})", "",
                  *_rank_profile(records, budget), ""]
    if args.timing_json.exists():
        lines += ["## Step time vs LoRA (ratio of medians, side by side)", "",
                  *_timing_table(json.loads(args.timing_json.read_text())), ""]
    if args.peft_json.exists():
        lines += ["## AdaLoRA vs peft's AdaLoRA (same config, seed and batches; final ranks)", "",
                  *_peft_lines(json.loads(args.peft_json.read_text())), ""]
    plots = _plots(records, args.out_dir)  # written (atomically) before the table that shows them
    lines += ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""]
    output = args.out_dir / "adaptive_rank.md"
    report = "\n".join(lines) + harness.kept_notes(output)
    harness.write_report(output, report)
    print(report)




def _date() -> str:
    return harness.environment()["date"][:10]


def _machine(threads: int) -> str:
    env = harness.environment(threads=threads)
    return f"{env['cores']} cores (shared), torch {env['torch']}, {env['threads']} thread(s), {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("accuracy", "one", "timing", "peft", "report"))
    parser.add_argument("job", nargs="?")
    parser.add_argument("--jsonl", type=Path, default=RESULTS / "adaptive_rank.jsonl")
    parser.add_argument("--timing-json", type=Path, default=RESULTS / "adaptive_rank_timing.json")
    parser.add_argument("--peft-json", type=Path, default=RESULTS / "adaptive_rank_peft.json")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "adaptive_rank_runs"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where `report` writes the table and plots")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peft-steps", type=int, default=STEPS)
    args = parser.parse_args()
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

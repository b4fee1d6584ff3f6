"""Update rules on LoRA: step time and memory as ratios to plain AdamW, and accuracy vs full fine-tuning.

Cost (`--part cost`): all-MiniLM-L6-v2 + mean pooling + Linear(384, 10) (the model and the fixed batch of
`lora_vs_peft.py`: the first 32 wordnet-nouns glosses, 32 tokens), LoRA rank 8, alpha 16 on query and value, the
head trained too, float32, base in train mode. Contenders: LoRA with AdamW (the baseline), LoRA+ (λ = 16),
LoRA-Pro (the paper's full-size moments), LoRA-Pro's memory-light variant, SAM (ρ = 0.05, AdamW inside),
LoRA-MGPO (ρ = 0.05, μ = β = 0.9; one pass, the base weights perturbed and restored around it), and full
fine-tuning with AdamW for reference. A whole step (forward, loss, backward, the rule's step — SAM's second
pass included — zero_grad) is timed alone, in blocks alternating between contenders in rotating order after
warm-up; medians and ratios of medians to LoRA + AdamW, for each repeat of the whole run. Memory: each
contender alone in a fresh child process for a few steps: peak RSS, and the optimizer state (every tensor in
`optimizer.state`) counted from tensor sizes.

Accuracy (`--part accuracy`): wordnet-nouns on MiniLM with `deltatune.finetune` (train_size 1000, 2 epochs, max
length 16, batch 32, linear decay, the head trained in every arm): LoRA r = 8 (alpha 16) with AdamW, with LoRA+
and with LoRA-Pro, and full fine-tuning (AdamW). The rate of each arm is chosen on seed 0's validation accuracy
over one grid shared by every arm (extended when the best rate is at an edge), then seeds 1 and 2 run at it.

Runs are kept in `--log` (JSONL, one finished run a line); a re-run skips them, so a stopped run resumes:

    HF_HUB_OFFLINE=1 flock /work/wt/heavy.lock sh -c '.venv/bin/python benchmarks/update_rules.py --part cost \
        --threads 1 && .venv/bin/python benchmarks/update_rules.py --part accuracy --threads 2'
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_vs_peft as shared  # noqa: E402
from deltatune.bench import harness  # noqa: E402

# contender -> (LoRA or full fine-tuning, update rule, its options)
CONTENDERS = {
    "LoRA + AdamW": ("lora", "adamw", {}),
    "LoRA + LoRA+": ("lora", "loraplus", {}),
    "LoRA + LoRA-Pro": ("lora", "lora_pro", {}),
    "LoRA + LoRA-Pro light": ("lora", "lora_pro_light", {}),
    "LoRA + SAM": ("lora", "sam", {"rho": 0.05}),
    "LoRA + MGPO": ("lora", "mgpo", {}),
    "full FT + AdamW": ("full", "adamw", {}),
}
BASELINE = "LoRA + AdamW"
VERSION = 3  # of the cost records: 2 adds the CPU clock and the training state, 3 adds MGPO (older: not read)
MIB = 1024 * 1024

TASK, SEEDS = "wordnet-nouns", (0, 1, 2)
RECIPE = {"train_size": 1000, "epochs": 2, "max_length": 16}
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
EXTENSION = (3e-5, 3e-2)  # tried when the best rate sits at that edge
ARMS = {  # arm -> (finetune method, params, update rule)
    "LoRA + AdamW": ("lora", {"rank": 8, "alpha": 16.0}, "adamw"),
    "LoRA + LoRA+": ("lora", {"rank": 8, "alpha": 16.0}, "loraplus"),
    "LoRA + LoRA-Pro": ("lora", {"rank": 8, "alpha": 16.0}, "lora_pro"),
    "full FT": ("full", {}, "adamw"),
}


# --- cost ---------------------------------------------------------------------------------------------------
def build(name: str, base: nn.Module):
    """(model, optimizer) of a contender: a fresh copy of `base`, adapted (or all trainable), its rule."""
    from deltatune.optim import build_update_rule

    kind, rule, options = CONTENDERS[name]
    model = copy.deepcopy(base)
    if kind == "full":
        model.requires_grad_(True)
    else:
        model = shared.adapt_deltatune(model)
    model.train()
    return model, build_update_rule(rule, model, lr=shared.LEARNING_RATE, **options)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, labels: torch.Tensor) -> None:
    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(**inputs), labels)
        loss.backward()
        return loss

    # MGPO (`PerturbsForward`): the one gradient pass runs with the base weights perturbed
    with optimizer.perturbed() if getattr(optimizer, "perturbs_forward", False) else contextlib.nullcontext():
        closure()
    if getattr(optimizer, "needs_closure", False):
        optimizer.step(closure)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(model, optimizer, inputs, labels) -> tuple[float, float]:
    """(wall, process CPU) seconds of one whole step; the CPU clock ignores time spent waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    train_step(model, optimizer, inputs, labels)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_contenders(blocks: int, per_block: int) -> dict[str, list[tuple[float, float]]]:
    inputs, labels = shared.real_batch()
    base = shared.base_classifier()
    built = {name: build(name, base) for name in CONTENDERS}
    for model, optimizer in built.values():  # warm-up
        for _ in range(2):
            train_step(model, optimizer, inputs, labels)
    names = list(CONTENDERS)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for block in range(blocks):
        for name in names[block % len(names):] + names[: block % len(names)]:
            times[name] += [timed(*built[name], inputs, labels) for _ in range(per_block)]
    return times


def memory_child(name: str, steps: int) -> dict:
    """In a fresh process: `steps` training steps of one contender; peak RSS and optimizer-state size."""
    inputs, labels = shared.real_batch()
    model, optimizer = build(name, shared.base_classifier())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(steps):
        train_step(model, optimizer, inputs, labels)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    if hasattr(optimizer, "base"):
        state += sum(t.numel() * t.element_size() for s in optimizer.base.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor))
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    return {"part": "memory", "version": VERSION, "contender": name, "peak_rss_before_steps_mib": before,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "optimizer_state_mib": state / MIB, "training_state_mib": (state + grads) / MIB,
            "trainable": sum(p.numel() for p in trainable)}


def run_cost(log: harness.RunLog, args: argparse.Namespace) -> None:
    jobs = [{"part": "time", "version": VERSION, "repeat": r} for r in range(args.repeats)]
    jobs += [{"part": "memory", "version": VERSION, "contender": name} for name in CONTENDERS]

    def run(job: dict) -> dict:
        if job["part"] == "time":
            times = time_contenders(args.blocks, args.per_block)
            return {**job, "steps_per_contender": args.blocks * args.per_block,
                    "medians_ms": {name: 1e3 * statistics.median(w for w, _ in v) for name, v in times.items()},
                    "cpu_medians_ms": {name: 1e3 * statistics.median(c for _, c in v) for name, v in times.items()}}
        command = harness.script_command(__file__, "--child-memory", job["contender"], "--threads", str(args.threads))
        return harness.run_child(command, label=job["contender"])

    harness.run_jobs(jobs, log, run, describe=lambda job: str(job))


# --- accuracy -----------------------------------------------------------------------------------------------
def accuracy_run(job: dict) -> dict:
    from deltatune.recipe import finetune

    method, params, rule = ARMS[job["arm"]]
    result = finetune(TASK, method, params, lr=job["lr"], seed=job["seed"], progress=False, update_rule=rule,
                      **RECIPE)
    return {**job, "validation": result.validation_score, "test": result.test_score, "seconds": result.seconds,
            "trainable": result.trainable.trainable}


def best_rate(records: list[dict], arm: str) -> float | None:
    rows = [r for r in records if r.get("part") == "accuracy" and r["arm"] == arm and r["seed"] == 0]
    return max(rows, key=lambda r: (r["validation"], -r["lr"]))["lr"] if rows else None


def run_accuracy(log: harness.RunLog) -> None:
    run = accuracy_run
    describe = lambda job: f"{job['arm']} lr {job['lr']:g} seed {job['seed']}"  # noqa: E731
    jobs = [{"part": "accuracy", "arm": arm, "lr": lr, "seed": 0} for arm in ARMS for lr in GRID]
    harness.run_jobs(jobs, log, run, describe=describe)
    for arm in ARMS:  # one extension step past an edge
        best = best_rate(log.records(), arm)
        extra = [EXTENSION[0]] if best == GRID[0] else [EXTENSION[1]] if best == GRID[-1] else []
        harness.run_jobs([{"part": "accuracy", "arm": arm, "lr": lr, "seed": 0} for lr in extra], log, run,
                         describe=describe)
    jobs = [{"part": "accuracy", "arm": arm, "lr": best_rate(log.records(), arm), "seed": seed}
            for arm in ARMS for seed in SEEDS[1:]]
    harness.run_jobs(jobs, log, run, describe=describe)


# --- the report ---------------------------------------------------------------------------------------------
def cost_tables(records: list[dict]) -> list[str]:
    version = _cost_version(records)
    timing = [r for r in records if r.get("part") == "time" and r.get("version", 1) == version]
    memory = {r["contender"]: r for r in records if r.get("part") == "memory" and r.get("version", 1) == version}
    lines = ["## Step time and memory (MiniLM, LoRA r = 8 on query and value, batch 32 × 32 tokens)", "",
             "| contender | " + " | ".join(f"repeat {r['repeat'] + 1}: wall ms (× AdamW), CPU ms (× AdamW)"
                                          for r in timing)
             + " | optimizer state MiB (× AdamW) | grads + optimizer state MiB (× AdamW) | peak RSS MiB (× AdamW)"
               " | trainable |", "|---" * (len(timing) + 5) + "|"]
    for name in CONTENDERS:
        cells = [_time_cell(r, name) for r in timing]
        mem, base = memory.get(name), memory.get(BASELINE)
        if mem and base:
            cells += [f"{mem[key]:.2f} ({mem[key] / base[key]:.2f})" if key in mem else "–"
                      for key in ("optimizer_state_mib", "training_state_mib")]
            cells += [f"{mem['peak_rss_mib']:.0f} ({mem['peak_rss_mib'] / base['peak_rss_mib']:.2f})",
                      f"{mem['trainable']:,}"]
        else:
            cells += ["–"] * 4
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    steps = timing[0]["steps_per_contender"] if timing else 0
    before = {name: round(m["peak_rss_before_steps_mib"]) for name, m in memory.items()
              if "peak_rss_before_steps_mib" in m}
    lines += ["", f"Medians of {steps} timed whole steps per contender per repeat, blocks in rotating order; "
              "wall = time.perf_counter, CPU = time.process_time (ignores waiting for a core on the shared "
              "machine). Memory: each contender alone in a fresh process (5 steps); optimizer state and gradients "
              "counted from tensor sizes (SAM: its AdamW's state). Peak RSS before the first step, MiB: "
              f"{before or 'not recorded'} (the high-water mark is set while loading, so RSS does not separate the "
              f"rules). Cost protocol version {version} (1: wall clock only).", ""]
    return lines


def _cost_version(records: list[dict]) -> int | None:
    """The newest cost protocol with a complete set of timing and memory records (records without one are 1)."""
    for version in range(VERSION, 0, -1):
        parts = {r["part"] for r in records if r.get("part") in ("time", "memory") and r.get("version", 1) == version}
        if parts == {"time", "memory"}:
            return version
    return None


def _time_cell(record: dict, name: str) -> str:
    wall, cpu = record["medians_ms"], record.get("cpu_medians_ms")
    if name not in wall:  # a contender added after this record's protocol version
        return "–"
    text = f"{wall[name]:.0f} ({wall[name] / wall[BASELINE]:.2f})"
    return text + (f", {cpu[name]:.0f} ({cpu[name] / cpu[BASELINE]:.2f})" if cpu else ", –")


def accuracy_tables(records: list[dict]) -> list[str]:
    rows = [r for r in records if r.get("part") == "accuracy"]
    if not rows:
        return ["## Accuracy", "", "Not run yet.", ""]
    lines = ["## Accuracy (wordnet-nouns, test %, rate chosen on seed 0's validation accuracy)", "",
             "| arm | trainable | best lr | seeds | validation % | test % |", "|---|---|---|---|---|---|"]
    for arm in ARMS:
        best = best_rate(records, arm)
        chosen = [r for r in rows if r["arm"] == arm and r["lr"] == best]
        if not chosen:
            continue
        lines.append(f"| {arm} | {chosen[0]['trainable']:,} | {best:g} | {len(chosen)} | "
                     f"{harness.mean_std([r['validation'] for r in chosen])} | "
                     f"{harness.mean_std([r['test'] for r in chosen])} |")
    lines += ["", "Gap to full fine-tuning (mean test points, full FT − arm): " + _gaps(records) + "."]
    rates = sorted({r["lr"] for r in rows})
    lines += ["", "Seed 0 at every rate (test %, validation % in parentheses):", "",
              "| arm | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for arm in ARMS:
        cell = {r["lr"]: f"{100 * r['test']:.1f} ({100 * r['validation']:.1f})" for r in rows
                if r["arm"] == arm and r["seed"] == 0}
        lines.append(f"| {arm} | " + " | ".join(cell.get(lr, "–") for lr in rates) + " |")
    return lines + [""]


def _gaps(records: list[dict]) -> str:
    means = {}
    for arm in ARMS:
        best = best_rate(records, arm)
        tests = [r["test"] for r in records if r.get("part") == "accuracy" and r["arm"] == arm and r["lr"] == best]
        if tests:
            means[arm] = 100 * statistics.mean(tests)
    if "full FT" not in means:
        return "full FT not run yet"
    return ", ".join(f"{arm} {means['full FT'] - value:+.1f}" for arm, value in means.items() if arm != "full FT")


def report(records: list[dict], env: dict, path: str) -> str:
    lines = ["# Update rules on LoRA: cost and accuracy", "", harness.environment_line(env), "",
             f"Command: `{env['command']}`", ""]
    return "\n".join(lines + cost_tables(records) + accuracy_tables(records)) + harness.kept_notes(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cost", "accuracy", "all", "report"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--per-block", type=int, default=2)
    parser.add_argument("--log", default="benchmarks/results/update_rules.jsonl")
    parser.add_argument("--report", default="benchmarks/results/update_rules.md")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        harness.emit(memory_child(args.child_memory, steps=5))
        return
    log = harness.RunLog(args.log, _identity)
    if args.part in ("cost", "all"):
        run_cost(log, args)
        harness.write_report(args.report, report(log.records(), harness.environment(threads=args.threads),
                                                 args.report))
    if args.part in ("accuracy", "all"):
        run_accuracy(log)
    text = report(log.records(), harness.environment(threads=args.threads), args.report)
    harness.write_report(args.report, text)
    print(text)


def _identity(mapping: dict):
    part = mapping.get("part")
    if part == "time":
        return [part, mapping.get("version"), mapping.get("repeat")]
    if part == "memory":
        return [part, mapping.get("version"), mapping.get("contender")]
    if part == "accuracy":
        return [part, mapping.get("arm"), mapping.get("lr"), mapping.get("seed")]
    return None


if __name__ == "__main__":
    main()

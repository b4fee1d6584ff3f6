"""SaRA's memory claim, measured: peak training memory and step time of SaRA vs the naive way, LoRA and full FT,
and of the other selective methods (SPT, ID³, SNELLA, BitFit) on the same work.

Every contender trains the same model — all-MiniLM-L6-v2 (read offline from the packaged files), mean pooling,
a Linear head with 10 classes (the `wordnet-nouns` task) — float32, AdamW (lr 1e-4, no weight decay, torch
defaults otherwise), on the same batch of real WordNet glosses padded to 32 tokens, model in train mode
(its dropout runs). The head is trained by every contender. "Targets" are the 36 Linear layers of the encoder
(query, key, value, attention output, intermediate, output; the unused pooler is excluded).

    sara          SaRAConfig(fraction=0.1): the smallest-|w| 10% of each target weight, values only; nuclear
                  norm (λ = 5e-4) on one random matrix per step, as in training
    sara-unfused  the same, forced onto the unfused path base(x) + x Sᵀ (sparse products only)
    naive         the same positions the official non-UB way: target weights trainable (dense .grad), the
                  gradient masked to the positions by a hook, AdamW state for the whole weights
    lora          LoRA on the same 36 matrices, rank chosen so the trainable count matches SaRA's
    full          every parameter trainable
    spt           SPT at the same 10% budget (global top-10% Taylor sensitivity from the benchmark batch; LoRA
                  rank 8 where the paper's rule says so)
    id3           ID³ at the same 10% budget (weight form: the update is a dense parameter whose gradient is
                  masked to the unmasked entries each step, so gradients and Adam state are dense)
    snella        SNELLA at LoRA's matching rank (the dense kernel is recomputed in backward, not stored)
    bitfit        the same layers' biases (its count cannot be matched; the smallest possible state)

Memory: each contender runs alone in a fresh child process. Reported: RSS after set-up (model, adapter, batch,
optimizer built; then glibc's `malloc_trim(0)` hands freed set-up scratch back to the system for every contender,
so scratch memory of the selection step is not counted as training memory), the peak RSS while training
(VmHWM reset after set-up through /proc/self/clear_refs, read after the steps), and the peak of the whole
process (ru_maxrss, includes loading). "Training state" is computed from tensor sizes after a step: gradients +
optimizer state (Adam moments and step counters); "adapter buffers" are the non-trainable tensors a method adds
(SaRA's positions, base and frozen values, masks, cached CSR pattern); "saved activations" are the tensors
autograd keeps for backward, counted once per storage through saved_tensors_hooks, parameters excluded.

Timing: one process holds every contender; after warm-up, blocks of steps alternate between contenders in
mirrored order (A B C, C B A, ...); each whole step (zero_grad + forward + loss + backward + AdamW step) is timed
alone; the table gives the median per contender and ratios of medians. The timing run is repeated (`--repeats`).
Child processes, the environment record and the atomic report are deltatune.bench.harness's.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparse_memory.py --threads 1 --repeats 2 \\
        --output benchmarks/results/sparse_memory.md --json benchmarks/results/sparse_memory.json
    .venv/bin/python benchmarks/sparse_memory.py --render benchmarks/results/sparse_memory.json \\
        --output benchmarks/results/sparse_memory.md     # the report again from the raw JSON, nothing measured
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from deltatune.bench import harness  # noqa: E402

TASK, BATCH, MAX_TOKENS, LEARNING_RATE, SEED, FRACTION = "wordnet-nouns", 32, 32, 1e-4, 0, 0.1
TARGET_LEAVES = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
CONTENDERS = ("sara", "sara-unfused", "naive", "lora", "full", "spt", "id3", "snella", "bitfit")
MIB = 1024 * 1024


# --- the shared model and batch -----------------------------------------------------------------------------
def real_batch(batch_size: int) -> tuple[dict[str, Tensor], Tensor]:
    from deltatune.data import load_task

    task = load_task(TASK, max_length=MAX_TOKENS)
    batch = task.collate([task.train[i] for i in range(batch_size)])
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]


def base_classifier() -> nn.Module:
    from deltatune.data.models import build_minilm_classifier

    torch.manual_seed(SEED)
    return build_minilm_classifier(10)


def target_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("backbone.encoder")]


def sara_trainable_count(model: nn.Module) -> int:
    return sum(round(FRACTION * model.get_submodule(p).weight.numel()) for p in target_paths(model))


def lora_rank_matching(model: nn.Module, count: int) -> int:
    per_rank = sum(sum(model.get_submodule(p).weight.shape) for p in target_paths(model))
    return max(1, round(count / per_rank))


# --- contenders -----------------------------------------------------------------------------------------------
def build(name: str) -> tuple[nn.Module, list]:
    """(model, trainer callbacks) of a contender, with exactly its trainable tensors requiring grad."""
    import deltatune as dt
    from deltatune.methods.sara import SaRAConfig

    model = base_classifier()
    paths = tuple(target_paths(model))
    if name in ("sara", "sara-unfused"):
        config = SaRAConfig(fraction=FRACTION, targets=paths, extra_trainable=("classifier",))
        dt.adapt(model, config)
        callbacks = config.training_callbacks(model, total_steps=10**6)  # the penalized matrix, each step
        if name == "sara-unfused":
            for _, _, delta in dt.iter_deltas(model):
                delta.forward_with_base = lambda x, base_layer: None  # decline the fused path
            dt.set_active(model, "default")  # re-plan the hosts
        return model, callbacks
    if name == "naive":
        return naive_model(model, paths), []
    if name == "lora":
        rank = lora_rank_matching(model, sara_trainable_count(model))
        dt.adapt(model, dt.LoRAConfig(rank=rank, alpha=float(rank), targets=paths, extra_trainable=("classifier",)))
        return model, []
    if name == "full":
        model.requires_grad_(True)
        return model, []
    return other_selective(name, model, paths)


def other_selective(name: str, model: nn.Module, paths: tuple[str, ...]) -> tuple[nn.Module, list]:
    """The other selective methods at SaRA's budget, with their trainer callbacks (ID³'s gradient masking after
    backward is part of its step)."""
    import deltatune as dt

    common = dict(targets=paths, extra_trainable=("classifier",))
    if name == "spt":
        inputs, labels = real_batch(BATCH)
        config = dt.SPTConfig(budget=FRACTION, sensitivity_batches=1, **common).plan(model, [{**inputs,
                                                                                               "labels": labels}])
    elif name == "id3":
        config = dt.ID3Config(budget=FRACTION, **common)
    elif name == "snella":
        rank = lora_rank_matching(model, sara_trainable_count(model))
        config = dt.SNELLAConfig(rank=rank + rank % 2, allocation_interval=8, **common)
    elif name == "bitfit":
        config = dt.BitFitConfig(**common)
    else:
        raise ValueError(name)
    dt.adapt(model, config)
    return model, config.training_callbacks(model, total_steps=10**6)


def naive_model(model: nn.Module, paths: tuple[str, ...]) -> nn.Module:
    """Dense gradients, then masked: the official `--disable_ub` path (`optim/adamw2.py`)."""
    from deltatune.allocate.selection import smallest_magnitude_positions

    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    for path in paths:
        weight = model.get_submodule(path).weight
        positions = smallest_magnitude_positions(weight, round(FRACTION * weight.numel()))
        mask = torch.zeros(weight.numel(), dtype=weight.dtype)
        mask[positions] = 1
        mask = mask.view_as(weight)
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask)
    return model


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, callbacks: list, inputs: dict,
               labels: Tensor) -> float:
    """One step as the Trainer runs it: the callbacks' hooks around forward/backward/update (step 0 each time:
    the schedules never reach a re-selection, which is not what is measured)."""
    import deltatune as dt
    from deltatune.train.callbacks import fire

    context = dict(model=model, optimizer=optimizer, global_step=0)
    optimizer.zero_grad(set_to_none=True)
    fire(callbacks, "on_step_begin", **context)
    loss = F.cross_entropy(model(**inputs), labels) + dt.regularization_loss(model)
    loss.backward()
    fire(callbacks, "on_backward_end", **context)
    optimizer.step()
    fire(callbacks, "on_step_end", **context)
    return float(loss.detach())


# --- accounting -------------------------------------------------------------------------------------------------
def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"gradients": grads, "optimizer": state, "trainable": trainable}


def adapter_buffer_bytes(model: nn.Module) -> int:
    import deltatune as dt

    total = 0
    for _, _, delta in dt.iter_deltas(model):
        total += sum(b.nbytes for b in delta.buffers())
        cache = getattr(delta, "_patterns", None)
        pattern = getattr(cache, "_pattern", None)
        if pattern is not None:
            total += sum(t.nbytes for t in pattern.cached_tensors())
    return total


def saved_activation_bytes(model: nn.Module, inputs: dict, labels: Tensor) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(**inputs), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def release_free_heap() -> None:
    """Return freed heap pages to the system (glibc), so RSS reflects live memory; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_memory_worker(name: str, steps: int, batch_size: int) -> dict:
    inputs, labels = real_batch(batch_size)
    model, callbacks = build(name)
    model.train()
    optimizer = optimizer_for(model)
    release_free_heap()
    rss_setup = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is training only
    losses = [train_step(model, optimizer, callbacks, inputs, labels) for _ in range(steps)]
    peak_train = _status_kib("VmHWM")
    state = training_state_bytes(model, optimizer)
    activations = saved_activation_bytes(model, inputs, labels)
    return {"contender": name, "rss_setup_mib": rss_setup / 1024, "peak_train_mib": peak_train / 1024,
            "peak_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "gradients_mib": state["gradients"] / MIB, "optimizer_mib": state["optimizer"] / MIB,
            "training_state_mib": (state["gradients"] + state["optimizer"]) / MIB, "trainable": state["trainable"],
            "adapter_buffers_mib": adapter_buffer_bytes(model) / MIB, "saved_activations_mib": activations / MIB,
            "losses": losses}


# --- timing -----------------------------------------------------------------------------------------------------
def run_timing(contenders: tuple[str, ...], rounds: int, block: int, batch_size: int) -> dict[str, list[float]]:
    inputs, labels = real_batch(batch_size)
    runs = {}
    for name in contenders:
        model, callbacks = build(name)
        model.train()
        runs[name] = (model, optimizer_for(model), callbacks)
    for model, optimizer, callbacks in runs.values():  # warm-up
        for _ in range(2):
            train_step(model, optimizer, callbacks, inputs, labels)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else tuple(reversed(contenders))
        for name in order:
            model, optimizer, callbacks = runs[name]
            for _ in range(block):
                start = time.perf_counter()
                train_step(model, optimizer, callbacks, inputs, labels)
                times[name].append(time.perf_counter() - start)
    return times


# --- driver -----------------------------------------------------------------------------------------------------
def child(args: list[str]) -> dict:
    return harness.run_child(harness.script_command(__file__, *args), label=f"child {args}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--output", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=("memory", "timing"))
    parser.add_argument("--render", type=Path, help="only re-render the Markdown from an earlier --json file")
    args = parser.parse_args()
    if args.render:
        report = render(json.loads(args.render.read_text()))
        if args.output:
            harness.write_report(args.output, report)
        print(report)
        return
    torch.set_num_threads(args.threads)
    contenders = tuple(args.contenders.split(","))
    common = ["--threads", str(args.threads), "--batch", str(args.batch)]
    if args.worker == "memory":
        harness.emit(run_memory_worker(contenders[0], args.memory_steps, args.batch))
        return
    if args.worker == "timing":
        harness.emit(run_timing(contenders, args.rounds, args.block, args.batch))
        return
    memory = [child(["--worker", "memory", "--contenders", c, "--memory-steps", str(args.memory_steps), *common])
              for c in contenders]
    timing = [child(["--worker", "timing", "--contenders", ",".join(contenders), "--rounds", str(args.rounds),
                     "--block", str(args.block), *common]) for _ in range(args.repeats)]
    record = {"memory": memory, "timing": timing, "meta": meta(args)}
    if args.json:
        harness.write_json(args.json, record)
    report = render(record)
    print(report)
    if args.output:
        harness.write_report(args.output, report)


def host_fuses() -> bool:
    """Whether this checkout's host calls an additive delta's `forward_with_base` (the fused sparse layer)."""
    import inspect

    from deltatune.core.host import AdaptedLayer

    return "forward_with_base" in inspect.getsource(AdaptedLayer)


def meta(args: argparse.Namespace) -> dict:
    """The harness's environment (date, versions, cores, threads, commit, command) and this run's settings."""
    return {"host_fuses": host_fuses(), **harness.environment(threads=args.threads), "batch": args.batch,
            "tokens": MAX_TOKENS, "memory_steps": args.memory_steps, "rounds": args.rounds, "block": args.block,
            "repeats": args.repeats}


def render(record: dict) -> str:
    by_name = {m["contender"]: m for m in record["memory"]}
    m = record["meta"]
    lines = [
        "# SaRA memory benchmark, with the other selective methods (all-MiniLM-L6-v2, wordnet-nouns)", "",
        f"{m['date']}, torch {m['torch']}, Python {m['python']}, {m['cores']} cores (shared), "
        f"{m['threads']} thread(s), batch {m['batch']} × {m['tokens']} tokens, float32, AdamW. "
        f"Host runs the fused sparse layer (`forward_with_base`): {'yes' if m['host_fuses'] else 'no'}."
        + (f" deltatune at {m['commit']}." if "commit" in m else ""), "",  # recorded since the harness
        f"Command: `{m['command']}`", "",
        "## Memory (each contender in a fresh process)", "",
        "| contender | trainable | training state MiB (grads + optimizer) | adapter buffers MiB | "
        "saved activations MiB | RSS after set-up MiB | peak RSS training MiB | peak RSS process MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in by_name.items():
        lines.append(
            f"| {name} | {row['trainable']:,} | {row['training_state_mib']:.1f} ({row['gradients_mib']:.1f} + "
            f"{row['optimizer_mib']:.1f}) | {row['adapter_buffers_mib']:.1f} | {row['saved_activations_mib']:.1f} | "
            f"{row['rss_setup_mib']:.0f} | {row['peak_train_mib']:.0f} | {row['peak_process_mib']:.0f} |")
    lines += ["", "## Ratios", ""] + ratio_lines(by_name, record["timing"])
    lines += ["", "## Step time (median seconds per step, one process, alternating blocks)", "",
              "| contender | " + " | ".join(f"run {i + 1}" for i in range(len(record["timing"]))) + " |",
              "| --- |" + " ---: |" * len(record["timing"])]
    for name in by_name:
        cells = [f"{statistics.median(t[name]):.3f} (n={len(t[name])})" for t in record["timing"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Notes", "",
              "- Training state is computed from tensor sizes (gradients + AdamW moments and step counters). SaRA's "
              "equals LoRA's at the same trainable count; the naive way pays dense gradients and moments for every "
              "target weight although only 10% of each can change.",
              "- SaRA's adapter buffers (int64 positions, W0 and frozen values, the active mask, the int32 CSR "
              "pattern) are not trainable state but live next to it; they are included in every RSS column. "
              "`sara-unfused` also caches the transposed pattern its input gradient needs.",
              "- The naive way also holds a dense float mask per target weight (set-up RSS).",
              "- SPT at a 10% budget gives LoRA (rank 8) to every matrix whose sensitive count passes the paper's "
              "rule, so its trainable count is lower than the budget. ID³ (weight form) trains a dense update "
              "whose gradient is masked after backward: its gradients and Adam state are dense, like the naive "
              "way's. SNELLA's kernel is recomputed in backward (checkpointing), which costs step time, not "
              "memory. BitFit's count (biases) cannot be matched.",
              "- Step times on a shared machine drift between runs (see both runs); compare ratios within a run.",
              "", "Raw numbers: the JSON file next to this one (every step time, every loss).", ""]
    return "\n".join(lines)


def ratio_lines(by_name: dict, timing: list[dict]) -> list[str]:
    def state(n: str) -> float:
        return by_name[n]["training_state_mib"]

    lines = []
    if {"sara", "naive"} <= set(by_name):
        lines.append(f"- SaRA training state / naive: {state('sara'):.2f} / {state('naive'):.2f} MiB = "
                     f"**{state('sara') / state('naive'):.3f}** (target ≤ 0.15)")
    if {"sara", "lora"} <= set(by_name):
        sara, lora = by_name["sara"]["peak_train_mib"], by_name["lora"]["peak_train_mib"]
        lines.append(f"- SaRA peak training RSS / LoRA: {sara:.0f} / {lora:.0f} MiB = **{sara / lora:.3f}** "
                     "(target ≤ 1.2)")
    for other in ("naive", "full"):
        if {"sara", other} <= set(by_name):
            a, b = by_name["sara"]["peak_train_mib"], by_name[other]["peak_train_mib"]
            lines.append(f"- SaRA peak training RSS / {other}: {a:.0f} / {b:.0f} MiB = {a / b:.3f}")
    for i, t in enumerate(timing if "sara" in by_name else []):  # ratios to SaRA need SaRA among the contenders
        medians = {n: statistics.median(v) for n, v in t.items()}
        parts = [f"{n} {medians[n] / medians['sara']:.2f}×" for n in medians if n != "sara"]
        lines.append(f"- step time relative to SaRA, run {i + 1}: " + ", ".join(parts))
    return lines


if __name__ == "__main__":
    main()

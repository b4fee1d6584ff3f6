"""Step time and training memory of the additive / prompt family as ratios to LoRA, side by side in one run.

Contenders on two real backbones, each at its library defaults (trainable counts reported, not matched: this
table is about cost; matched-count accuracy is in adapters.md, audio_petl.md, vpt.md and the leaderboard):
LoRA (reference), SSF, Houlsby / Pfeiffer / parallel bottleneck adapters, IAA (connected), and the prompt
methods — VPT deep and shallow on the GlyphViT (glyphs-novel-vit), prompt tuning on MiniLM (wordnet-nouns).

Time: every contender is built once in this process; their whole training steps (forward, backward, AdamW step,
zero_grad) alternate A B C ... on the same batch, WARMUP steps dropped, median over STEPS, ratio to LoRA's median
in the same round; ROUNDS rounds. Memory (deterministic, no sampling): the bytes autograd saves for backward in
one forward (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once) plus the trainable
parameters' gradients and AdamW's two moments — what a training step holds beyond the frozen model.

    flock /work/wt/heavy.lock python benchmarks/additive_cost.py          # ~3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from deltatune.bench import harness  # noqa: E402

CONTENDERS = {  # task -> label -> (method, params); LoRA first: the reference
    "glyphs-novel-vit": {
        "lora": ("lora", {}), "ssf": ("ssf", {}),
        "houlsby": ("bottleneck_adapter", {"targets": "houlsby"}),
        "pfeiffer": ("bottleneck_adapter", {"targets": "pfeiffer"}),
        "parallel": ("parallel_adapter", {"targets": "pfeiffer"}), "iaa": ("iaa", {}),
        "vpt-deep": ("vpt", {"deep": True}), "vpt-shallow": ("vpt", {"deep": False}),
    },
    "wordnet-nouns": {
        "lora": ("lora", {}), "ssf": ("ssf", {}),
        "houlsby": ("bottleneck_adapter", {"targets": "houlsby"}),
        "pfeiffer": ("bottleneck_adapter", {"targets": "pfeiffer"}),
        "parallel": ("parallel_adapter", {"targets": "pfeiffer"}), "iaa": ("iaa", {}),
        "prompt tuning": ("prompt_tuning", {}),
    },
}
BATCH, MAX_LENGTH, WARMUP, STEPS, ROUNDS = 32, 32, 2, 10, 3


def contender(task, method: str, params: dict):
    from deltatune.recipe import prepare_model

    model, _ = prepare_model(task, method, params, seed=0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-3), trainable


def loss_of(model, batch: dict):
    from deltatune.data.datasets import model_inputs

    return torch.nn.functional.cross_entropy(model(**model_inputs(batch)), batch["labels"])


def train_step(model, optimizer, batch: dict) -> None:
    loss_of(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_for_backward_bytes(model, batch: dict, loss_fn=loss_of) -> int:
    """Bytes autograd keeps from one forward for the backward pass, each storage once (`loss_fn(model, batch)`:
    the classification loss unless told; a causal LM passes its own)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(model, batch)
    del loss
    return sum(storages.values())


def memory_mib(model, trainable, batch: dict) -> float:
    """Saved activations + gradients + AdamW's two moments of the trainable parameters, MiB."""
    state = 3 * sum(p.numel() * p.element_size() for p in trainable)
    return (saved_for_backward_bytes(model, batch) + state) / 2**20


def measure(task_name: str) -> list[dict]:
    from deltatune.data import load_task

    task = load_task(task_name, max_length=MAX_LENGTH)
    batch = task.collate([task.train[i] for i in range(BATCH)])
    built = {label: contender(task, *spec) for label, spec in CONTENDERS[task_name].items()}
    rounds = []
    for _ in range(ROUNDS):
        timers = {label: harness.StepTimer() for label in built}
        for _ in range(WARMUP + STEPS):
            for label, (model, optimizer, _) in built.items():
                timers[label].on_step_begin()
                train_step(model, optimizer, batch)
                timers[label].on_step_end()
        rounds.append({label: statistics.median(t.seconds[WARMUP:]) for label, t in timers.items()})
    memory = {label: memory_mib(model, trainable, batch) for label, (model, _, trainable) in built.items()}
    return [{"task": task_name, "method": label, "trainable": sum(p.numel() for p in built[label][2]),
             "step_seconds": [r[label] for r in rounds],
             "time_ratio": [r[label] / r["lora"] for r in rounds],
             "memory_mib": memory[label], "memory_ratio": memory[label] / memory["lora"]} for label in built]


def render(rows: list[dict], env: dict) -> str:
    lines = ["# Additive and prompt methods: step time and training memory as ratios to LoRA (one run)", "",
             harness.environment_line(env), "", "Command: `python benchmarks/additive_cost.py`", "",
             (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
             "| task | method | trainable (with head) | step time (s, per round) | step time ×LoRA (per round) | "
             "memory (MiB) | memory ×LoRA |", "|---|---|---:|---|---|---:|---:|"]
    for row in rows:
        times = ", ".join(f"{s:.3f}" for s in row["step_seconds"])
        ratios = ", ".join(f"{r:.2f}" for r in row["time_ratio"])
        lines.append(f"| {row['task']} | {row['method']} | {row['trainable']:,} | {times} | {ratios} | "
                     f"{row['memory_mib']:.1f} | {row['memory_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/additive_cost")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [row for task_name in CONTENDERS for row in measure(task_name)]
    report = Path(f"{args.output}.md")
    harness.write_json(f"{args.output}.json", rows)
    harness.write_report(report, render(rows, harness.environment(threads=args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

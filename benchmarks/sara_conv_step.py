"""SaRA's training step on the glyph DDPM's UNet with and without its fused convolution path, next to LoRA's.

SaRA adapts the UNet's convolutions too (LoRA's default is its attention projections); on a convolution the
unfused path runs the base conv plus a second conv with the dense sparse update S (five conv ops with their
backward), the fused one a single conv with W0 + S (three). Same model, batch (32 training digits of
diffusion-handwritten, fixed timesteps and noise), seed and thread count; SaRA at LoRA rank 8's trainable count
(`sara_diffusion.method_params`). Whole steps (forward, loss, backward, AdamW, zero_grad) are timed in blocks
alternating between the contenders in rotating order after warm-up; medians and their ratios, per repeat.

    HF_HUB_OFFLINE=1 flock /work/wt/heavy.lock .venv/bin/python benchmarks/sara_conv_step.py --threads 1 \
        --output benchmarks/results/sara_conv_step.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sara_diffusion  # noqa: E402
from deltatune.bench import harness  # noqa: E402

CONTENDERS = ("LoRA", "SaRA fused", "SaRA unfused")
BATCH, SEED = 32, 0


def build(name: str, task):
    from deltatune.core.model import iter_hosts
    from deltatune.recipe import prepare_model

    method = "lora" if name == "LoRA" else "sara"
    model, _ = prepare_model(task, method, sara_diffusion.method_params(method), seed=SEED, batch_size=BATCH)
    if name == "SaRA unfused":
        for _, host in iter_hosts(model):
            host._fuse_first_additive = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model.train(), optimizer


def fixed_batch(task) -> tuple:
    batch = task.collate([task.train[i] for i in range(BATCH)])
    generator = torch.Generator().manual_seed(SEED)
    timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
    noise = torch.randn(batch["pixels"].shape, generator=generator)
    return batch["pixels"], batch["labels"], timesteps, noise


def step(contender, batch) -> float:
    model, optimizer = contender
    start = time.perf_counter()
    model.denoising_loss(*batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(contenders: dict, batch, blocks: int, per_block: int) -> dict[str, list[float]]:
    for contender in contenders.values():
        for _ in range(2):
            step(contender, batch)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for block in range(blocks):
        for name in names[block % len(names):] + names[:block % len(names)]:
            times[name] += [step(contenders[name], batch) for _ in range(per_block)]
    return times


def render(runs: list[dict[str, list[float]]], env: dict, counts: dict[str, int]) -> str:
    lines = ["# SaRA's step on the glyph DDPM UNet: fused vs unfused convolutions, vs LoRA", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             "Trainable: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()), "",
             "| repeat | " + " | ".join(f"{name} (ms)" for name in CONTENDERS)
             + " | SaRA fused / LoRA | SaRA unfused / LoRA | fused / unfused |", "|---" * (len(CONTENDERS) + 4) + "|"]
    for index, times in enumerate(runs, 1):
        median = {name: statistics.median(values) for name, values in times.items()}
        ratios = (median["SaRA fused"] / median["LoRA"], median["SaRA unfused"] / median["LoRA"],
                  median["SaRA fused"] / median["SaRA unfused"])
        lines.append(f"| {index} | " + " | ".join(f"{median[n] * 1e3:.1f}" for n in CONTENDERS) + " | "
                     + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    lines += ["", f"Medians of {len(runs[0]['LoRA'])} timed steps per contender per repeat, batch {BATCH}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from deltatune.data import load_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--per-block", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/sara_conv_step.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task(sara_diffusion.TASK)
    contenders = {name: build(name, task) for name in CONTENDERS}
    counts = {name: sum(p.numel() for p in model.parameters() if p.requires_grad)
              for name, (model, _) in contenders.items()}
    batch = fixed_batch(task)
    runs = [measure(contenders, batch, args.blocks, args.per_block) for _ in range(args.repeats)]
    text = render(runs, harness.environment(threads=args.threads), counts)
    harness.write_report(args.output, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())

"""DoRA's training-step time as a ratio to our LoRA and to peft's DoRA, measured side by side in one run.

The model and batch are those of `lora_vs_peft.py`: all-MiniLM-L6-v2 + mean pooling + Linear(384, 10) head
(trained too), rank 8, alpha 16, dropout 0, on `query` and `value`, float32, AdamW (lr 1e-4), the first 32
wordnet-nouns glosses padded to 32 tokens, the base in train mode (its own dropout runs). Contenders:
deltatune LoRA, deltatune DoRA, peft DoRA (and peft LoRA, for peft's own DoRA/LoRA ratio). Each whole step
(forward + loss + backward + AdamW step + zero_grad) is timed alone, in blocks alternating between contenders
in rotating order after warm-up; the table gives each contender's median and the ratios of medians, for every
repeat of the whole run. Before timing, the outputs of our DoRA and peft's DoRA are compared with the same
(non-zero) adapter tensors: deltatune writes a peft folder, peft loads it.

`--backbone vit` runs the same contenders on the shipped GlyphViT (transformers ViTModel, 806k parameters) with
the glyphs-novel-vit head (24 classes, trained too), rank 8 on its q_proj and v_proj, batch 64 glyph images.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dora_step_time.py --threads 1 --repeats 2 \
        --output benchmarks/results/dora_step_time.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dora_step_time.py --threads 1 --repeats 2 --backbone vit \
        --output benchmarks/results/dora_step_time_vit.md
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
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

CONTENDERS = ("deltatune LoRA", "deltatune DoRA", "peft DoRA", "peft LoRA")
VIT_TASK, VIT_BATCH = "glyphs-novel-vit", 64


def minilm_setup() -> tuple[nn.Module, dict, torch.Tensor, tuple[str, ...], str]:
    inputs, labels = shared.real_batch()
    return shared.base_classifier(), inputs, labels, shared.TARGETS, "all-MiniLM-L6-v2, batch 32 × 32 tokens"


def vit_setup() -> tuple[nn.Module, dict, torch.Tensor, tuple[str, ...], str]:
    from deltatune.data import load_task

    task = load_task(VIT_TASK)
    batch = task.collate([task.train[i] for i in range(VIT_BATCH)])
    labels = batch.pop("labels")
    torch.manual_seed(shared.SEED)
    return (task.build_model(), batch, labels, tuple(task.default_targets),
            f"GlyphViT ({VIT_TASK}), batch {VIT_BATCH} images of 16x16")


BACKBONES = {"minilm": minilm_setup, "vit": vit_setup}


def adapt(name: str, model: nn.Module, targets: tuple[str, ...]) -> nn.Module:
    import peft

    import deltatune as dt

    torch.manual_seed(shared.SEED + 1)
    common = dict(rank=shared.RANK, alpha=shared.ALPHA, dropout=shared.DROPOUT, targets=list(targets),
                  extra_trainable=["classifier"])
    if name.startswith("deltatune"):
        config = dt.DoRAConfig(**common) if name.endswith("DoRA") else dt.LoRAConfig(**common)
        return dt.adapt(model, config)
    config = peft.LoraConfig(r=shared.RANK, lora_alpha=shared.ALPHA, lora_dropout=shared.DROPOUT,
                             target_modules=list(targets), modules_to_save=["classifier"],
                             use_dora=name.endswith("DoRA"))
    return peft.get_peft_model(model, config)


def build(name: str, base: nn.Module, targets: tuple[str, ...]) -> shared.Contender:
    model = adapt(name, copy.deepcopy(base), targets).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=shared.LEARNING_RATE)
    return shared.Contender(name, model, optimizer)


def output_difference(ours: shared.Contender, theirs: shared.Contender, inputs: dict) -> float:
    """Max |logit difference| of our DoRA and peft's DoRA holding the same non-zero tensors (eval mode)."""
    import peft
    from safetensors.torch import load_file

    import deltatune as dt

    generator = torch.Generator().manual_seed(shared.SEED + 2)
    saved = {k: v.detach().clone() for k, v in ours.model.state_dict().items() if ".deltas." in k}
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(ours.model):
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=generator) * 0.05)
            delta.lora_magnitude.mul_(1 + 0.1 * torch.randn(delta.lora_magnitude.shape, generator=generator))
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(ours.model, Path(tmp) / "a", format="peft")
        peft.set_peft_model_state_dict(theirs.model, load_file(str(Path(tmp) / "a" / "adapter_model.safetensors")))
        ours.model.eval(), theirs.model.eval()
        with torch.no_grad():
            difference = (ours.model(**inputs) - theirs.model(**inputs)).abs().max().item()
        ours.model.load_state_dict(saved, strict=False)
        dt.save_adapter(ours.model, Path(tmp) / "b", format="peft")  # back to the common initial state
        peft.set_peft_model_state_dict(theirs.model, load_file(str(Path(tmp) / "b" / "adapter_model.safetensors")))
    ours.model.train(), theirs.model.train()
    return difference


def timed_step(contender: shared.Contender, inputs: dict, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(contender.model(**inputs), labels)
    loss.backward()
    contender.optimizer.step()
    contender.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(contenders: list[shared.Contender], inputs, labels, blocks: int, per_block: int) -> dict[str, list]:
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for contender in contenders:  # warm-up
        for _ in range(3):
            timed_step(contender, inputs, labels)
    for block in range(blocks):
        order = contenders[block % len(contenders):] + contenders[: block % len(contenders)]
        for contender in order:
            times[contender.name] += [timed_step(contender, inputs, labels) for _ in range(per_block)]
    return times


def report(runs: list[dict[str, list]], difference: float, env: dict, setting: str) -> str:
    lines = [f"# DoRA step time vs LoRA and peft's DoRA ({setting}, r = 8)",
             "", harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             "| repeat | " + " | ".join(f"{name} (ms)" for name in CONTENDERS)
             + " | ours DoRA / ours LoRA | ours DoRA / peft DoRA | peft DoRA / peft LoRA |",
             "|---" * (len(CONTENDERS) + 4) + "|"]
    for index, times in enumerate(runs, 1):
        median = {name: statistics.median(values) for name, values in times.items()}
        cells = [f"{median[name] * 1e3:.1f}" for name in CONTENDERS]
        ratios = [median["deltatune DoRA"] / median["deltatune LoRA"], median["deltatune DoRA"] / median["peft DoRA"],
                  median["peft DoRA"] / median["peft LoRA"]]
        lines.append(f"| {index} | " + " | ".join(cells) + " | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    lines += ["", f"Medians of {len(next(iter(runs[0].values())))} timed steps per contender per repeat "
              "(whole steps: forward, loss, backward, AdamW step, zero_grad), blocks alternating in rotating order.",
              f"Same adapter tensors in our DoRA and peft's DoRA: max |logit difference| = {difference:.2e} (float32).",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--per-block", type=int, default=3)
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="minilm")
    parser.add_argument("--output", default="benchmarks/results/dora_step_time.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, inputs, labels, targets, setting = BACKBONES[args.backbone]()
    contenders = [build(name, base, targets) for name in CONTENDERS]
    difference = output_difference(contenders[1], contenders[2], inputs)
    runs = [measure(contenders, inputs, labels, args.blocks, args.per_block) for _ in range(args.repeats)]
    text = report(runs, difference, harness.environment(threads=args.threads), f"{setting}, on {', '.join(targets)}")
    harness.write_report(args.output, text)
    print(text)


if __name__ == "__main__":
    main()

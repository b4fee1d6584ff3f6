"""Pretrain SpeechAST on the 25 pretraining keywords (seeded, CPU, minutes).

    flock /work/wt/heavy.lock python -m deltatune.data.pretrain_speech > speech-ast.log 2>&1
    python -m deltatune.data.pretrain_speech [--epochs N] [--out DIR] [--seed 0]

Recipe: AdamW (betas 0.9/0.999), linear warm-up over the first 5% of steps then cosine decay to 0, batch 32,
label smoothing 0.1, on-the-fly SpecAugment-style augmentation from a seeded generator (every clip shifted in
time by -8..8 frames, circularly; one frequency mask of 0-8 mel bins and one time mask of 0-12 frames, set to 0,
the standardized mean); train speakers only (files/speech-keywords-train.safetensors). After every epoch the
validation-speaker accuracy is measured and the best epoch's weights are kept; the test-speaker accuracy of those
weights is reported. Writes the weights, the config json, a summary json and the model card into `--out`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from deltatune.data.datasets import TensorDictDataset, evaluate_accuracy
from deltatune.data.glyphs import FILES_DIR
from deltatune.data.pretrain_vision import train_epoch
from deltatune.data.speech import read_speech, split_arrays
from deltatune.data.speech_ast import AST_WEIGHTS, SpeechAST, write_speech_ast

RECIPE = {"epochs": 100, "lr": 5e-4, "weight_decay": 0.05}
BATCH_SIZE = 32
WARMUP_SHARE = 0.05
MAX_SHIFT, MAX_FREQ_MASK, MAX_TIME_MASK = 8, 8, 12


def keyword_splits() -> dict[str, TensorDictDataset]:
    """The pretraining task's train / validation / test splits as {"spectrogram", "labels"} datasets."""
    train, evaluation = read_speech("keywords-train"), read_speech("keywords-eval")
    splits = {}
    for split, arrays in (("train", train), ("validation", evaluation), ("test", evaluation)):
        spectrogram, labels = split_arrays(arrays, split)
        splits[split] = TensorDictDataset({"spectrogram": spectrogram, "labels": labels})
    return splits


def _mask(length: int, size: int, max_width: int, generator: torch.Generator) -> torch.Tensor:
    """(count, length) bool: one random band of width 0..max_width per row."""
    width = torch.randint(0, max_width + 1, (size, 1), generator=generator)
    start = (torch.rand(size, 1, generator=generator) * (length - width + 1)).long()
    positions = torch.arange(length)[None, :]
    return (positions >= start) & (positions < start + width)


def augment(spectrogram: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Circular time shift, one frequency mask and one time mask per clip (see the module docstring)."""
    count, _, bins, frames = spectrogram.shape
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (count,), generator=generator)
    index = (torch.arange(frames)[None, :] - shifts[:, None]) % frames
    shifted = spectrogram.gather(3, index[:, None, None, :].expand(count, 1, bins, frames))
    freq = _mask(bins, count, MAX_FREQ_MASK, generator)[:, None, :, None]
    time_ = _mask(frames, count, MAX_TIME_MASK, generator)[:, None, None, :]
    return shifted.masked_fill(freq | time_, 0.0)


def learning_rate_factor(step: int, total: int) -> float:
    warmup = max(1, int(WARMUP_SHARE * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(epochs: int, seed: int, log) -> tuple[SpeechAST, dict]:
    """Train SpeechAST from scratch; return the best-validation model and a summary."""
    torch.manual_seed(seed)
    splits = keyword_splits()
    model = SpeechAST()
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    total_steps = epochs * math.ceil(len(splits["train"]) / BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, total_steps))
    generator = torch.Generator().manual_seed(seed)
    best_accuracy, best_state, best_epoch = -1.0, None, 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, optimizer, scheduler, splits["train"], generator, inputs="spectrogram",
                           augment_batch=augment, batch_size=BATCH_SIZE)
        accuracy = evaluate_accuracy(model, splits["validation"], batch_size=256)
        if accuracy > best_accuracy:
            best_accuracy, best_state, best_epoch = accuracy, copy.deepcopy(model.state_dict()), epoch
        print(f"epoch {epoch} loss {loss:.4f} validation {accuracy:.4f} ({time.perf_counter() - started:.0f} s)",
              file=log, flush=True)
    model.load_state_dict(best_state)
    summary = {
        "model": "speech-ast", "seed": seed, **RECIPE, "epochs": epochs, "best_epoch": best_epoch,
        "batch_size": BATCH_SIZE, "parameters": sum(p.numel() for p in model.parameters()),
        **{f"{split}_clips": len(data) for split, data in splits.items()},
        "validation_accuracy": best_accuracy,
        "test_accuracy": evaluate_accuracy(model, splits["test"], batch_size=256),
        "train_accuracy": evaluate_accuracy(model, splits["train"], batch_size=256),
        "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return model, summary


def model_card(summary: dict, weights_bytes: int) -> str:
    """The model card text (markdown), from the summary."""
    return f"""# SpeechAST (speech-ast.safetensors)

Pretrained here, on this machine's CPU, by `deltatune.data.pretrain_speech`; loaded offline with
`deltatune.data.load_speech_ast()`.

- Architecture: an AST-style audio spectrogram transformer: transformers ViTModel over the (1, 64 mel, 80 frame)
  log-mel image, 8x8 patches (80 tokens + CLS), hidden 128, 4 layers, 4 heads, MLP 512, GELU, pre-LN, no dropout,
  no pooler; head = Linear(128, 25) on the final-layer-norm CLS token. Module names as GlyphViT's.
- Parameters: {summary['parameters']:,} (float32; weights file {weights_bytes / 1e6:.1f} MB).
- Data: files/speech-keywords-train.safetensors and -eval (deltatune.data.build_speech: English words
  synthesized with eSpeak NG, our own log-mel front end; licence note in files/ESPEAK_NG_NOTE.txt), the 25
  pretraining keywords; train speakers (12 espeak-ng voice variants x 8 accents, {summary['train_clips']:,}
  clips), model selection on 3 other variants ({summary['validation_clips']:,} clips), held-out accuracy on 3
  more variants ({summary['test_clips']:,} clips; speakers disjoint). The 10 novel words were never heard.
- Recipe: AdamW lr {summary['lr']:g}, weight decay {summary['weight_decay']:g}, batch {summary['batch_size']},
  {summary['epochs']} epochs, 5% linear warm-up then cosine to 0, label smoothing 0.1, time shift +-8 frames and
  one frequency (0-8 bins) and one time (0-12 frames) mask per clip, seed {summary['seed']}; the best validation
  epoch is kept ({summary['best_epoch']}).
- Accuracy (25 keywords, chance 0.04): train {summary['train_accuracy']:.4f}, validation
  {summary['validation_accuracy']:.4f}, **test (held-out speakers) {summary['test_accuracy']:.4f}**.
- Time: {summary['seconds']:.0f} s on {summary['threads']} threads of a shared 2-core CPU (torch {summary['torch']}).
- Command: `flock /work/wt/heavy.lock python -m deltatune.data.pretrain_speech` (writes speech-ast.safetensors,
  speech-ast.json, speech-ast-pretrain.json and this card into files/).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.data.pretrain_speech",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(FILES_DIR), help=f"output folder (default {FILES_DIR})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, summary = pretrain(args.epochs, args.seed, sys.stdout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_speech_ast(model, out)
    (out / "speech-ast-pretrain.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "speech-ast.md").write_text(model_card(summary, (out / AST_WEIGHTS).stat().st_size), encoding="utf-8")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

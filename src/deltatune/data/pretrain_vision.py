"""Pretrain GlyphViT or GlyphCNN on the 62 source glyph classes of the train fonts (seeded, CPU, minutes).

    flock /work/wt/heavy.lock python -m deltatune.data.pretrain_vision --model vit > vit.log 2>&1
    python -m deltatune.data.pretrain_vision --model cnn [--epochs N] [--out DIR] [--seed 0]

Recipe: AdamW (betas 0.9/0.999), linear warm-up over the first 5% of steps then cosine decay to 0, batch 128,
label smoothing 0.1, on-the-fly augmentation of every batch (a random affine map per image: rotation within
+-10 degrees, scale 0.9-1.1, shift within +-1 px, from a seeded generator); train fonts only (both rendered
variants). After every epoch the validation-font accuracy is measured and the best epoch's weights are kept
(selection on validation); the test-font accuracy of those weights is reported. Writes the weights, the config
json and a model card into `--out` (default: the package's files/ folder) and prints one JSON summary line.
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
from torch import nn

from deltatune.data.datasets import TensorDictDataset, evaluate_accuracy
from deltatune.data.glyphs import FILES_DIR, glyph_subset, read_glyphs
from deltatune.data.vision import GlyphCNN, GlyphViT, write_model_files

RECIPES = {
    "vit": {"epochs": 8, "lr": 2e-3, "weight_decay": 0.05},
    "cnn": {"epochs": 10, "lr": 2e-3, "weight_decay": 0.01},
}
BATCH_SIZE = 128
WARMUP_SHARE = 0.05
LABEL_SMOOTHING = 0.1


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random affine map per image (rotation +-10 deg, scale 0.9-1.1, shift +-1 px), bilinear, zero fill."""
    count = pixels.shape[0]
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(count, generator=generator)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (2.0 / pixels.shape[-1])  # 1 px in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def learning_rate_factor(step: int, total: int) -> float:
    warmup = max(1, int(WARMUP_SHARE * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def source_split(arrays: dict[str, torch.Tensor], split: str) -> TensorDictDataset:
    pixels, labels = glyph_subset(arrays, split)
    return TensorDictDataset({"pixels": pixels, "labels": labels})


def train_epoch(model, optimizer, scheduler, train: TensorDictDataset, generator: torch.Generator, *,
                inputs: str = "pixels", augment_batch=None, batch_size: int = BATCH_SIZE) -> float:
    """One pass over the shuffled training set with label-smoothed cross-entropy; returns the mean loss.
    `inputs` names the dataset tensor the model reads, `augment_batch(x, generator)` its augmentation (default:
    the glyphs' `augment`); the speech pretraining uses it with its spectrograms."""
    augment_batch = augment_batch or augment
    model.train()
    order = torch.randperm(len(train), generator=generator)
    total_loss = 0.0
    for start in range(0, len(train), batch_size):
        batch = order[start:start + batch_size]
        x = augment_batch(train.tensors[inputs][batch], generator)
        loss = nn.functional.cross_entropy(model(x), train.labels[batch], label_smoothing=LABEL_SMOOTHING)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += float(loss.detach()) * len(batch)
    return total_loss / len(train)


def pretrain(kind: str, epochs: int, seed: int, log) -> tuple[nn.Module, dict]:
    """Train `kind` ("vit" or "cnn"); return the best-validation model and a summary."""
    torch.manual_seed(seed)
    arrays = read_glyphs()
    train, validation, test = (source_split(arrays, split) for split in ("train", "validation", "test"))
    model = GlyphViT() if kind == "vit" else GlyphCNN()
    recipe = RECIPES[kind]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    total_steps = epochs * math.ceil(len(train) / BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, total_steps))
    generator = torch.Generator().manual_seed(seed)
    best_accuracy, best_state, best_epoch = -1.0, None, 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, optimizer, scheduler, train, generator)
        accuracy = evaluate_accuracy(model, validation, batch_size=512)
        if accuracy > best_accuracy:
            best_accuracy, best_state, best_epoch = accuracy, copy.deepcopy(model.state_dict()), epoch
        print(f"epoch {epoch} loss {loss:.4f} validation {accuracy:.4f} ({time.perf_counter() - started:.0f} s)",
              file=log, flush=True)
    model.load_state_dict(best_state)
    seconds = time.perf_counter() - started
    summary = {
        "model": kind, "seed": seed, "epochs": epochs, "best_epoch": best_epoch, **recipe, "batch_size": BATCH_SIZE,
        "parameters": sum(p.numel() for p in model.parameters()), "train_images": len(train),
        "validation_images": len(validation), "test_images": len(test), "validation_accuracy": best_accuracy,
        "test_accuracy": evaluate_accuracy(model, test, batch_size=512),
        "train_accuracy": evaluate_accuracy(model, train, batch_size=512), "seconds": round(seconds, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return model, summary


ARCHITECTURES = {
    "vit": "transformers ViTModel: 16x16 input, 4x4 patches (16 tokens + CLS), hidden 128, 4 layers, 4 heads, "
           "MLP 512, GELU, no dropout, no pooler; head = Linear(128, 62) on the final-layer-norm CLS token",
    "cnn": "4 blocks conv3x3 (with bias, so SSF can merge) - BatchNorm2d - ReLU, channels 32, 64, 64, 128, "
           "2x2 max-pool after blocks 0 and 2 (16 -> 8 -> 4 px), global average pool (the 128-d `features`), "
           "head = Linear(128, 62)",
}


def model_card(summary: dict, weights_bytes: int) -> str:
    """The model card text (markdown) of one pretrained backbone, from its summary."""
    kind = summary["model"]
    name = {"vit": "GlyphViT", "cnn": "GlyphCNN"}[kind]
    return f"""# {name} (glyph-{kind}.safetensors)

Pretrained here, on this machine's CPU, by `deltatune.data.pretrain_vision`; loaded offline with
`deltatune.data.load_glyph_{kind}()`.

- Architecture: {ARCHITECTURES[kind]}.
- Parameters: {summary['parameters']:,} (float32; weights file {weights_bytes / 1e6:.1f} MB).
- Data: files/glyphs.safetensors (deltatune.data.build_glyphs: 16x16 renderings of Debian's free fonts, licences
  in files/FONTS_LICENSES.txt), the 62 source classes 0-9, A-Z, a-z; train fonts only ({summary['train_images']:,}
  images, both rendered variants), model selection on the validation fonts ({summary['validation_images']:,}
  images), held-out accuracy on the test fonts ({summary['test_images']:,} images; font families disjoint).
  The 24 novel (Greek) classes were never seen.
- Recipe: AdamW lr {summary['lr']:g}, weight decay {summary['weight_decay']:g}, batch {summary['batch_size']},
  {summary['epochs']} epochs, 5% linear warm-up then cosine to 0, label smoothing 0.1, random affine
  augmentation per image (rotation +-10 deg, scale 0.9-1.1, shift +-1 px), seed {summary['seed']}; the best
  validation epoch is kept ({summary['best_epoch']}).
- Accuracy (62 classes; many glyphs are ambiguous by design at 16 px: l / I / 1 / |, O / o / 0, c / C, s / S, ...):
  train {summary['train_accuracy']:.4f}, validation {summary['validation_accuracy']:.4f},
  **test (held-out fonts) {summary['test_accuracy']:.4f}**.
- Time: {summary['seconds']:.0f} s on {summary['threads']} threads of a shared 2-core CPU (torch {summary['torch']}).
- Command: `flock /work/wt/heavy.lock python -m deltatune.data.pretrain_vision --model {kind}` (writes
  glyph-{kind}.safetensors, glyph-{kind}.json, glyph-{kind}-pretrain.json and this card into files/).
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.data.pretrain_vision",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(RECIPES), required=True)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (vit 8, cnn 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(FILES_DIR), help=f"output folder (default {FILES_DIR})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or RECIPES[args.model]["epochs"]
    model, summary = pretrain(args.model, epochs, args.seed, sys.stdout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_model_files(model, args.model, out)
    (out / f"glyph-{args.model}-pretrain.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    weights_bytes = (out / f"glyph-{args.model}.safetensors").stat().st_size
    (out / f"glyph-{args.model}.md").write_text(model_card(summary, weights_bytes), encoding="utf-8")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

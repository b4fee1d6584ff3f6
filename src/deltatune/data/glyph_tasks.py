"""Downstream vision tasks on the pretrained glyph backbones: `<task>-vit` (GlyphViT) and `<task>-cnn` (GlyphCNN).

- `glyphs-<b>`: the source task itself, 62 classes ('0'-'9', 'A'-'Z', 'a'-'z'), train / validation / test fonts
  (both rendered variants); the head starts as the pretrained one (the model is at its card accuracy on load).
- `glyphs-novel-<b>`: 24 Greek letters never seen in pretraining (deltatune.data.glyphs.NOVEL_CLASSES), same font
  splits (only fonts that have all 24), a fresh head.
- `glyphs-rotated-<b>`: the source task corrupted: every image rotated about its centre by 30-60 degrees (either
  direction) and shrunk to 85% (so the corners stay inside), blended with its 3x3 Gaussian blur (weight uniform in
  [0, 1]) and given Gaussian noise (std 0.1), clipped to [0, 1]; all drawn from `torch.Generator` seed 0 in array
  order, so the corrupted splits are fixed. The head starts as the pretrained one.
- `handwritten-<b>`: scikit-learn's 8x8 handwritten digits (the `digits` task's split, 1,259 / 179 / 359) mapped to
  the glyph domain: bilinear resize 8x8 -> 12x12 (align_corners=False) and 2 px of black padding -> 16x16, so a
  digit spans 12 px like a glyph (13 px for the largest glyph of a font). The head starts as the pretrained
  head's rows for '0'-'9' (`build_model(head="fresh")` for a fresh one). Few-shot: `train_size`.

Items are {"pixels": (1, 16, 16) float32 in [0, 1], "labels": int64}. ViT tasks set `default_targets` to
("q_proj", "v_proj"), the LoRA paper's Wq, Wv under transformers 5's ViT names; CNN tasks to ("conv",), every
convolution (None would leave LoRA's default, all-linear, nothing but the head to adapt).
`build_model(head=...)`: "pretrained" (rows of the pretrained head, where the task has them) or "fresh".
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.data.datasets import LABELS, TensorDictDataset
from deltatune.data.digits import read_digits, split_indices
from deltatune.data.glyphs import NOVEL_CLASSES, SOURCE_CLASSES, glyph_subset, read_glyphs
from deltatune.data.task import SPLITS, Task, limit_train_size
from deltatune.data.vision import VIT_DEFAULT_TARGETS, load_glyph_cnn, load_glyph_vit
from deltatune.errors import ConfigError

BACKBONES: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...] | None]] = {
    "vit": (load_glyph_vit, VIT_DEFAULT_TARGETS),
    # the convolutions (blocks.<i>.conv): with None, a method's own default (all-linear) would find no layer
    # but the head, so `deltatune train --task glyphs-cnn` would stop with a targeting error
    "cnn": (load_glyph_cnn, ("conv",)),
}
HEADS = ("pretrained", "fresh")
CORRUPTION_SEED = 0
HANDWRITTEN_SIZE, HANDWRITTEN_PAD = 12, 2


@dataclass(frozen=True)
class GlyphTaskSpec:
    base: str  # glyphs, glyphs-novel, glyphs-rotated, handwritten
    description: str
    label_names: tuple[str, ...]
    pretrained_rows: tuple[int, ...] | None  # rows of the pretrained 62-way head the task's head starts from


GLYPH_TASKS = {
    spec.base: spec
    for spec in (
        GlyphTaskSpec("glyphs", "glyphs of 62 classes (0-9, A-Z, a-z) from Debian fonts, split by font family; "
                      "the pretraining task", SOURCE_CLASSES, tuple(range(len(SOURCE_CLASSES)))),
        GlyphTaskSpec("glyphs-novel", "24 Greek letters never seen in pretraining, same font split, fresh head",
                      NOVEL_CLASSES, None),
        GlyphTaskSpec("glyphs-rotated", "the 62-class glyphs rotated 30-60 degrees, blurred and noisy (fixed)",
                      SOURCE_CLASSES, tuple(range(len(SOURCE_CLASSES)))),
        GlyphTaskSpec("handwritten", "scikit-learn handwritten digits resized to 16x16 (domain shift), head from "
                      "the glyph digits", tuple(str(digit) for digit in range(10)), tuple(range(10))),
    )
}


def glyph_task_names() -> list[str]:
    return [f"{base}-{backbone}" for base in GLYPH_TASKS for backbone in BACKBONES]


def build_glyph_model(backbone: str, rows: tuple[int, ...] | None, num_classes: int,
                      head: str | None = None) -> nn.Module:
    """The pretrained backbone with the task's head: pretrained rows (default where the task has them) or fresh."""
    head = head or ("pretrained" if rows is not None else "fresh")
    if head not in HEADS:
        raise ConfigError(f"head={head!r} is invalid: expected one of {HEADS}")
    if head == "pretrained" and rows is None:
        raise ConfigError("head='pretrained' is invalid for this task: its classes were never pretrained; "
                          "pass head='fresh'")
    model = BACKBONES[backbone][0]()
    pretrained = model.classifier
    model.classifier = nn.Linear(pretrained.in_features, num_classes)  # fresh, from torch's global RNG
    if head == "pretrained":
        with torch.no_grad():
            model.classifier.weight.copy_(pretrained.weight[list(rows)])
            model.classifier.bias.copy_(pretrained.bias[list(rows)])
    return model


def rotate_blur_noise(pixels: torch.Tensor, seed: int = CORRUPTION_SEED) -> torch.Tensor:
    """The fixed corruption of `glyphs-rotated` (see the module docstring), one draw per image in order."""
    generator = torch.Generator().manual_seed(seed)
    count = pixels.shape[0]
    magnitude = math.radians(30) + torch.rand(count, generator=generator) * math.radians(30)
    sign = torch.randint(0, 2, (count,), generator=generator) * 2 - 1
    angle = magnitude * sign
    shrink = 0.85
    cos, sin = torch.cos(angle) / shrink, torch.sin(angle) / shrink
    zeros = torch.zeros(count)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    rotated = nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3)
    blurred = nn.functional.conv2d(rotated, kernel, padding=1)
    blend = torch.rand(count, 1, 1, 1, generator=generator)
    noise = torch.randn(pixels.shape, generator=generator) * 0.1
    return ((1 - blend) * rotated + blend * blurred + noise).clamp(0.0, 1.0)


def handwritten_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 16, 16): bilinear 8 -> 12 px, then 2 px black padding."""
    pixels, labels = read_digits()
    resized = nn.functional.interpolate(pixels, size=HANDWRITTEN_SIZE, mode="bilinear", align_corners=False)
    padded = nn.functional.pad(resized.clamp(0.0, 1.0), [HANDWRITTEN_PAD] * 4)
    return padded, labels


@functools.lru_cache(maxsize=4)
def _glyph_splits(base: str) -> dict[str, TensorDictDataset]:
    """The fixed splits of a glyph task, shared by its vit and cnn versions (cached: they are read-only)."""
    if base == "handwritten":
        pixels, labels = handwritten_pixels()
        full = TensorDictDataset({"pixels": pixels, LABELS: labels})
        return {name: full.subset(indices) for name, indices in split_indices(labels.tolist()).items()}
    arrays = read_glyphs()
    splits = {}
    for split in SPLITS:
        pixels, labels = glyph_subset(arrays, split, novel=base == "glyphs-novel")
        splits[split] = TensorDictDataset({"pixels": pixels, LABELS: labels})
    if base == "glyphs-rotated":
        # one generator over the three splits in order, so no split reuses another's draws
        sizes = [len(splits[split]) for split in SPLITS]
        corrupted = rotate_blur_noise(torch.cat([splits[split].tensors["pixels"] for split in SPLITS]))
        for split, chunk in zip(SPLITS, corrupted.split(sizes)):
            splits[split] = TensorDictDataset({"pixels": chunk.contiguous(), LABELS: splits[split].labels})
    return splits


def load_glyph_task(name: str, *, max_length: int = 32, train_size: int | None = None, seed: int = 0) -> Task:
    """A glyph-backbone task `<base>-<vit|cnn>`; `max_length` is accepted for a uniform signature and ignored."""
    del max_length
    base, _, backbone = name.rpartition("-")
    spec = GLYPH_TASKS[base]
    splits = _glyph_splits(base)
    return Task(
        name=name, description=f"{spec.description} ({backbone.upper()} backbone)", label_names=spec.label_names,
        train=limit_train_size(splits["train"], train_size, seed), validation=splits["validation"],
        test=splits["test"], model_factory=functools.partial(build_glyph_model, backbone, spec.pretrained_rows),
        default_targets=BACKBONES[backbone][1],
    )

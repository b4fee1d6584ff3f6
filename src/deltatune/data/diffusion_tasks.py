"""`diffusion-handwritten`: adapt the pretrained glyph DDPM to generate scikit-learn's handwritten digits.

Data: the `handwritten-*` glyph tasks' images (scikit-learn digits at 16x16: bilinear 8 -> 12 px, 2 px black
padding) and the `digits` split (1,259 / 179 / 359). Items {"pixels": (1, 16, 16) in [0, 1], "labels": digit};
the label is the class id the DDPM is conditioned on, which for a digit is its glyph id (0-9).

Model: `load_glyph_ddpm()` (files/glyph-ddpm.*); its `forward(pixels, labels)` returns the denoising loss the
trainer minimises (validation/test "loss" is that loss at seeded-by-the-trainer random timesteps).
Metric: `fd_cnn` (lower is better), the Fréchet distance in the pretrained GlyphCNN's features between digits
generated for the split's labels (cycled to max(500, split size) samples; DPM-Solver++ 10 steps, starting
noise from seed 0, no guidance) and the split's real images. `generation_report` adds the frozen digit judge's
accuracy on those samples, and `glyph_degradation` the base domain's FD-CNN before vs after adaptation.
Targets: `default_targets` None (each method's own default; LoRA's all-linear is the UNet's attention
projections, time/class embedding MLPs excluded by nothing); `extra_trainable` is empty (no head).
"""
from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from deltatune.data.datasets import LABELS, TensorDictDataset
from deltatune.data.diffusion import GlyphDiffusion, load_glyph_ddpm
from deltatune.data.diffusion_eval import sample_like
from deltatune.data.digits import split_indices
from deltatune.data.frechet import fd_cnn
from deltatune.data.task import Task, limit_train_size
from deltatune.errors import ConfigError

NAME = "diffusion-handwritten"
DESCRIPTION = ("generate scikit-learn handwritten digits (16x16) with the glyph DDPM, digit-conditioned; "
               "metric FD-CNN (lower is better)")
METRIC = "fd_cnn"


def build_glyph_ddpm(num_classes: int | None = None, **kwargs: Any) -> GlyphDiffusion:
    """The pretrained glyph DDPM (a fresh copy); `num_classes` is the task's (10 digits) and must fit the
    DDPM's 62 glyph classes, whose ids 0-9 are the digits."""
    if kwargs:
        raise ConfigError(f"build_model{tuple(kwargs)} is invalid: the glyph DDPM takes no options; call "
                          "task.build_model()")
    model = load_glyph_ddpm()
    if num_classes is not None and num_classes > model.config.num_classes:
        raise ConfigError(f"num_classes={num_classes} is invalid: expected at most the DDPM's "
                          f"{model.config.num_classes} classes")
    return model


def score_fd_cnn(model: nn.Module, dataset: Dataset) -> float:
    """FD-CNN of the model's samples for the dataset's labels against the dataset's images (module doc)."""
    pixels, labels = dataset.tensors["pixels"], dataset.tensors[LABELS]
    images, _ = sample_like(model, labels)
    return fd_cnn(images, pixels)


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, TensorDictDataset]:
    from deltatune.data.glyph_tasks import handwritten_pixels

    pixels, labels = handwritten_pixels()
    full = TensorDictDataset({"pixels": pixels, LABELS: labels})
    return {name: full.subset(indices) for name, indices in split_indices(labels.tolist()).items()}


def load_diffusion_handwritten_task(*, max_length: int = 32, train_size: int | None = None, seed: int = 0) -> Task:
    """The diffusion-handwritten task; `max_length` is accepted for a uniform signature and ignored."""
    del max_length
    splits = _splits()
    return Task(
        name=NAME, description=DESCRIPTION, label_names=tuple(str(digit) for digit in range(10)),
        train=limit_train_size(splits["train"], train_size, seed), validation=splits["validation"],
        test=splits["test"], model_factory=build_glyph_ddpm, extra_trainable=(), default_targets=None,
        metric=METRIC, higher_is_better=False, scorer=score_fd_cnn,
    )

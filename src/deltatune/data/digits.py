"""The `digits` task: scikit-learn's copy of the UCI optical handwritten digits (1,797 8x8 images, 10 classes).

Source: `sklearn.datasets.load_digits` (bundled with scikit-learn, read offline; UCI ML hand-written digits,
E. Alpaydin and C. Kaynak, CC BY 4.0). Pixels 0..16 are scaled to [0, 1] float32 and shaped (N, 1, 8, 8).
Split (fixed, seed 0): for each digit, its image indices are shuffled by one `random.Random(0)` (digits in order
0..9) and cut into test (round(20%)), validation (round(10%)) and train (the rest): 1,259 / 179 / 359 images.
Items are {"pixels": (1, 8, 8) float32, "labels": int64}.
"""
from __future__ import annotations

import random

import torch

from deltatune.data.datasets import LABELS, TensorDictDataset
from deltatune.data.models import build_digits_model
from deltatune.data.sampling import group_by_label
from deltatune.data.task import SPLITS, Task, limit_train_size
from deltatune.errors import DeltatuneError

DESCRIPTION = "scikit-learn 8x8 handwritten digits -> digit 0-9 (1,797 images, stratified 70/10/20 split)"
SHARES = {"test": 0.2, "validation": 0.1}  # train takes the rest
SPLIT_SEED = 0


def read_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (1797, 1, 8, 8) float32 in [0, 1], labels (1797,) int64) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DeltatuneError(
            "the digits task needs scikit-learn, which is not installed; "
            "install it with `pip install 'deltatune[data]'`"
        ) from None
    bunch = load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 4-bit counts: max 16
    return pixels, torch.tensor(bunch.target, dtype=torch.long)


def split_indices(labels: list[int], seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Per-class shuffled cut into test / validation / train; each split's indices returned sorted."""
    rng = random.Random(seed)
    groups = group_by_label(labels)
    splits: dict[str, list[int]] = {split: [] for split in SPLITS}
    for label in sorted(groups):
        members = list(groups[label])
        rng.shuffle(members)
        test_count = round(SHARES["test"] * len(members))
        validation_count = round(SHARES["validation"] * len(members))
        splits["test"] += members[:test_count]
        splits["validation"] += members[test_count:test_count + validation_count]
        splits["train"] += members[test_count + validation_count:]
    return {split: sorted(indices) for split, indices in splits.items()}


def load_digits_task(*, max_length: int = 32, train_size: int | None = None, seed: int = 0) -> Task:
    """The digits task; `max_length` is accepted for a uniform signature and ignored (images have no tokens)."""
    del max_length
    pixels, labels = read_digits()
    full = TensorDictDataset({"pixels": pixels, LABELS: labels})
    splits = {name: full.subset(indices) for name, indices in split_indices(labels.tolist()).items()}
    return Task(
        name="digits", description=DESCRIPTION, label_names=tuple(str(digit) for digit in range(10)),
        train=limit_train_size(splits["train"], train_size, seed),
        validation=splits["validation"], test=splits["test"], model_factory=build_digits_model,
    )

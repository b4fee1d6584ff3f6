"""Train the frozen judge of generated handwritten digits (files/digit-judge.safetensors, card digit-judge.md).

    python -m deltatune.data.train_digit_judge --out src/deltatune/data/files

Recipe: DigitJudge (deltatune.data.diffusion_eval) on the training split of scikit-learn's handwritten digits at
16x16 (the glyph tasks' resize: bilinear 8 -> 12 px, 2 px black padding; the `digits` split), AdamW lr 3e-3,
batch 64, 30 epochs, seed 0, 1 thread; each batch is shifted by a random -1..1 pixel (seeded) so that the judge
does not depend on the exact centring of a generated digit. Prints validation and test accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deltatune.data.diffusion_eval import JUDGE_FILE, DigitJudge, class_accuracy
from deltatune.data.digits import split_indices
from deltatune.data.glyph_tasks import handwritten_pixels


def random_shift(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The batch rolled by one seeded (dy, dx) in -1..1 (the 2 px black border makes the roll a shift)."""
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    return torch.roll(pixels, shifts=(dy, dx), dims=(2, 3))


def train_judge(epochs: int = 30, lr: float = 3e-3, batch_size: int = 64, seed: int = 0) -> tuple[DigitJudge, dict]:
    torch.set_num_threads(1)
    pixels, labels = handwritten_pixels()
    splits = {name: (pixels[idx], labels[idx]) for name, idx in split_indices(labels.tolist()).items()}
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    judge = DigitJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr)
    train_pixels, train_labels = splits["train"]
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(train_pixels), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(judge(random_shift(train_pixels[batch], generator)), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    judge.eval()
    metrics = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
               "seconds": round(time.perf_counter() - started, 1),
               "parameters": sum(p.numel() for p in judge.parameters()),
               **{f"{name}_accuracy": class_accuracy(judge, *splits[name]) for name in ("validation", "test")}}
    return judge, metrics


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "files")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    judge, metrics = train_judge(epochs=args.epochs)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(args.out / JUDGE_FILE))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

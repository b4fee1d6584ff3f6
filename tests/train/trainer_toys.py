"""Small datasets and models for the trainer tests (fast on two shared CPU cores)."""
from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset


class BlobDataset(Dataset):
    """`n` points in `features` dimensions, labelled by which of `classes` random centres they are nearest to."""

    def __init__(self, n: int = 60, features: int = 6, classes: int = 3, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        generator = torch.Generator().manual_seed(seed)
        centres = torch.randn(classes, features, generator=generator) * 2
        labels = torch.arange(n) % classes
        self.x = (centres[labels] + torch.randn(n, features, generator=generator)).to(dtype)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.labels[index]}


class SmallNet(nn.Module):
    """Two Linear layers with dropout in between; `frozen_first=True` leaves only the head trainable."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3, dropout: float = 0.0,
                 frozen_first: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(features, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, classes)
        self.body.requires_grad_(not frozen_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.body(x))))


def small_net(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> SmallNet:
    torch.manual_seed(seed)
    return SmallNet(**kwargs).to(dtype)


def lora_net(seed: int = 0, dtype: torch.dtype = torch.float32, rank: int = 2, **kwargs) -> nn.Module:
    """SmallNet with LoRA on `body` and a trainable head, adapted with deltatune (B != 0 after training)."""
    import deltatune as dt

    model = small_net(seed, dtype, **kwargs)
    torch.manual_seed(seed + 1)
    return dt.adapt(model, dt.LoRAConfig(rank=rank, targets=["body"], extra_trainable=["head"]))


def trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: str) -> None:
    save_file({k: v.contiguous() for k, v in trainable_snapshot(model).items()}, path)

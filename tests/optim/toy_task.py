"""A two-layer toy classifier, its transformers-Trainer form and its seeded data set: what the update-rule
tests train."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))


def toy_data(size: int = 48) -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(size, 6, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


class HFToy(Toy):
    """The toy as transformers' Trainer wants it: keyword inputs, a dict with the loss."""

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        logits = super().forward(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

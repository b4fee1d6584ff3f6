"""A small float64 model and data for allocator tests, plus a plain training loop."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import deltatune as dt


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(10, 16)
        self.second = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=generator, dtype=torch.float64)
    return x, (x[:, :3] * torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)).argmax(dim=1)


class Blobs(Dataset):
    def __init__(self, n: int = 48, seed: int = 0) -> None:
        self.x, self.labels = data(n, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.labels[index]}


def adapted(config: dt.DeltaConfig, seed: int = 0) -> Net:
    return dt.adapt(net(seed), config)


def train(model: nn.Module, allocator, steps: int, lr: float = 0.05, micro_batches: int = 1, batch: int = 24,
          optimizer: str = "sgd", seed: int = 0, start: int = 1) -> torch.optim.Optimizer:
    """Plain loop: forward/backward (optionally split into micro-batches), optimizer step, allocator step."""
    x, y = data()
    parameters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(parameters, lr=lr) if optimizer == "sgd" else torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1, start):
        torch.randint(0, len(y), (batch,), generator=generator)
    for step in range(start, start + steps):
        index = torch.randint(0, len(y), (batch,), generator=generator)
        for part in index.chunk(micro_batches):
            loss = F.cross_entropy(model(x[part]), y[part], reduction="sum") / batch
            (loss + dt.regularization_loss(model) / micro_batches).backward()
        opt.step()
        if allocator is not None:
            allocator.step(model, step, opt)
        opt.zero_grad()
    return opt

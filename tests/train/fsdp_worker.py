"""Run by test_fsdp.py under `torchrun --nproc_per_node=2` (FSDP2 over gloo), and in-process for the reference.

    python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp_worker.py OUT_DIR

For LoRA, SaRA and the bottleneck adapter: a frozen base with deltas in two blocks, sharded with
`shard_model`, three AdamW steps on this process's half of a global batch of 8; rank 0 writes the gathered
trainable tensors and, from an unsharded copy, the adapter with `deltatune.save_adapter`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import deltatune as dt
from deltatune.train.distributed import gather_trainable, setup_world, shard_model

METHODS = ("lora", "sara", "bottleneck_adapter")
STEPS = 3


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def adapted(method: str) -> nn.Module:
    torch.manual_seed(0)
    options = {"rank": 2} if method == "lora" else {}
    return dt.adapt(Blocks().double(), dt.config_for(method, targets=["blocks.0.0", "blocks.1.0"], **options))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 8, generator=generator, dtype=torch.float64), torch.randint(3, (8,), generator=generator)


def train(model: nn.Module, rank: int, size: int) -> None:
    """Each process's loss is the mean over its equal share, so FSDP's gradient average is the global mean's."""
    x, y = batch()
    share = len(x) // size
    x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(STEPS):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def run_all(out: Path) -> None:
    torch.set_num_threads(1)
    world = setup_world()
    for method in METHODS:
        model = adapted(method)
        if world.distributed:
            shard_model(model)
        train(model, world.rank, world.size)
        tensors = gather_trainable(model)
        if world.is_main:
            save_file(tensors, str(out / f"{method}.safetensors"))
            unsharded = adapted(method)
            unsharded.load_state_dict(tensors, strict=False)
            dt.save_adapter(unsharded, out / f"{method}-adapter")


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))

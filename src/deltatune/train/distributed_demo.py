"""A runnable multi-process example: the commands of the README's "More than one process or machine".

    torchrun --nproc_per_node=2 -m deltatune.train.distributed_demo --sharding ddp  --out runs/ddp
    torchrun --nproc_per_node=2 -m deltatune.train.distributed_demo --sharding fsdp --out runs/fsdp
    torchrun --nproc_per_node=2 -m deltatune.train.distributed_demo --loop accelerate --sharding fsdp --out runs/acc

A frozen two-block MLP on Gaussian blobs (made here, seeded: no download) gets a delta method (default SaRA,
whose schedule re-selects entries half-way) and trains for `--steps` steps on a global batch of 16, with the
deltatune Trainer (`--loop trainer`, checkpoints in OUT/checkpoints) or a plain accelerate loop (`--loop
accelerate`: accelerate prepares the loader and optimizer; under `--sharding fsdp` deltatune shards the
model, since accelerate's FSDP plugin does not shard on CPU, and under `ddp` accelerate wraps it). Rank 0
saves the complete adapter in OUT/adapter and prints one line. One process (`python -m ...`) works too.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import deltatune as dt
from deltatune.train.callbacks import fire
from deltatune.train.config import SHARDINGS, TrainConfig
from deltatune.train.distributed import (
    World,
    average_replicated_gradients,
    leave_process_group,
    setup_world,
    shard_model,
)
from deltatune.train.sharding import differentiable_parameters, full_parameters, save_full_adapter
from deltatune.train.trainer import Trainer

WIDTH, CLASSES, EXAMPLES, BATCH = 32, 4, 64, 16


class Blobs(Dataset):
    """`EXAMPLES` points around `CLASSES` seeded centres in float64 (a dict dataset: {"x", "labels"})."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        centres = torch.randn(CLASSES, WIDTH, generator=generator, dtype=torch.float64) * 2
        self.labels = torch.arange(EXAMPLES) % CLASSES
        self.x = centres[self.labels] + torch.randn(EXAMPLES, WIDTH, generator=generator, dtype=torch.float64)

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.labels[index]}


class TwoBlocks(nn.Module):
    """Two Linear + Tanh blocks (one FSDP unit each) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def adapted_model(method: str) -> tuple[nn.Module, dt.DeltaConfig]:
    """The seeded base with `method` on both blocks (the head trains too)."""
    torch.manual_seed(0)
    config = dt.config_for(method, targets=["blocks.0.0", "blocks.1.0"], extra_trainable=["head"])
    return dt.adapt(TwoBlocks().to(torch.float64), config), config


def train_with_trainer(args: argparse.Namespace) -> tuple[nn.Module, World]:
    model, config = adapted_model(args.method)
    settings = TrainConfig(max_steps=args.steps, batch_size=BATCH, lr=0.02, progress=False, sharding=args.sharding,
                           output_dir=str(args.out))
    trainer = Trainer(model, settings, Blobs(), callbacks=config.training_callbacks(model, args.steps))
    trainer.train()
    return trainer.model, trainer.world


def train_with_accelerate(args: argparse.Namespace) -> tuple[nn.Module, World]:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world = setup_world()  # the process group accelerate joined
    model, config = adapted_model(args.method)
    schedules = config.training_callbacks(model, args.steps)
    sharded = args.sharding == "fsdp" and world.distributed
    if sharded:
        shard_model(model)  # before the optimizer is built: sharding replaces the parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    loader = DataLoader(Blobs(), batch_size=BATCH // accelerator.num_processes, shuffle=False)
    if sharded:
        optimizer, loader = accelerator.prepare(optimizer, loader)
        forward = model
    else:
        forward, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    inner = optimizer.optimizer
    for step, batch in zip(range(args.steps), _cycle(loader)):
        with full_parameters(model, inner):  # the schedule sees full tensors, decides alike on every process
            fire(schedules, "on_step_begin", global_step=step, model=model, optimizer=inner)
        task_loss = nn.functional.cross_entropy(forward(batch["x"]), batch["labels"])
        with differentiable_parameters(model):  # after forward: the regularizer on gathered tensors
            loss = task_loss + dt.regularization_loss(model)
        accelerator.backward(loss)
        if sharded:
            average_replicated_gradients(model, world)
        optimizer.step()
        with full_parameters(model, inner):
            fire(schedules, "on_step_end", global_step=step + 1, model=model, optimizer=inner)
        optimizer.zero_grad()
    return model, world


def _cycle(loader: DataLoader):
    while True:
        yield from loader


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="deltatune on several processes: DDP or FSDP2 (see module doc)")
    parser.add_argument("--loop", choices=("trainer", "accelerate"), default="trainer")
    parser.add_argument("--sharding", choices=SHARDINGS, default="fsdp")
    parser.add_argument("--method", default="sara")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/distributed-demo"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, world = (train_with_trainer if args.loop == "trainer" else train_with_accelerate)(args)
    path = save_full_adapter(model, args.out / "adapter", world)
    if world.is_main:
        print(f"{args.loop} ({args.sharding}, {world.size} process{'es' if world.size > 1 else ''}): "
              f"{args.method} adapter saved to {path}")
    end_process_group()
    return path


def end_process_group() -> None:
    """Wait for every process and leave the process group before the interpreter exits: accelerate's gloo
    group is destroyed by nothing, and one torn down under a peer still receiving aborted that peer at exit
    ("terminate called without an active exception"; see `distributed.leave_process_group`)."""
    leave_process_group()


if __name__ == "__main__":
    main()

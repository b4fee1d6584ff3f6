"""Run by test_accelerate_fsdp.py under `torchrun --nproc_per_node=2` (accelerate reads torchrun's environment),
and in-process for the one-process reference.

    python -m torch.distributed.run --standalone --nproc_per_node=2 accelerate_fsdp_worker.py OUT_DIR

Two plain accelerate loops train a float64 two-block net for 6 steps on a global batch of 8 (each process its
prepared loader's share), firing SaRA's schedule (nuclear penalty, progressive re-selection at step 3):

- "plugin": `Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))`, everything
  through `accelerator.prepare`. accelerate (1.15) takes the FSDP path only for GPU-like devices: on CPU the
  state stays MULTI_CPU and `prepare` wraps the model with DDP. The worker records the distributed type.
- "sharded": accelerate for the loader, optimizer and backward; the model sharded with deltatune's
  `shard_model` (FSDP2) and not given to `prepare`; the schedule fired inside `sharding.full_parameters`, the
  regularizer read inside `sharding.differentiable_parameters`, the adapter written by `save_full_adapter`.

Rank 0 writes OUT_DIR/<loop>-adapter (deltatune format) and OUT_DIR/<loop>.json (distributed type, losses).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deltatune as dt
from deltatune.train.callbacks import fire
from deltatune.train.distributed import average_replicated_gradients, setup_world, shard_model
from deltatune.train.distributed_demo import end_process_group
from deltatune.train.sharding import differentiable_parameters, full_parameters, save_full_adapter

F64 = torch.float64
WIDTH = 24
STEPS = 6
GLOBAL_BATCH = 8
LOOPS = ("plugin", "sharded")


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def config() -> dt.DeltaConfig:
    return dt.config_for("sara", targets=["blocks.0.0", "blocks.1.0"], fraction=0.3, nuclear_weight=0.05,
                         nuclear_min_dim=4, seed=3)


def adapted() -> nn.Module:
    torch.manual_seed(0)
    return dt.adapt(Blocks().to(F64), config())


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(STEPS * GLOBAL_BATCH, WIDTH, generator=generator, dtype=F64),
                         torch.randint(3, (STEPS * GLOBAL_BATCH,), generator=generator))


def run_loop(loop: str, out: Path) -> None:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2) if loop == "plugin" else None
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    world = setup_world()  # the process group accelerate joined
    model = adapted()
    schedules = config().training_callbacks(model, STEPS)
    sharded = loop == "sharded" and world.distributed
    if sharded:
        shard_model(model)  # before the optimizer: sharding replaces the parameters
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loader = DataLoader(data(), batch_size=GLOBAL_BATCH // accelerator.num_processes, shuffle=False)
    if sharded:
        optimizer, loader = accelerator.prepare(optimizer, loader)
        trained = model
    else:
        trained, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    losses = []
    for step, (x, y) in enumerate(loader):
        context = dict(model=model, optimizer=inner, scheduler=None, epoch=0)
        with full_parameters(model, inner):
            fire(schedules, "on_step_begin", global_step=step, **context)
        task_loss = nn.functional.cross_entropy(trained(x), y)
        with differentiable_parameters(model):  # after forward: FSDP's own hooks run there
            loss = task_loss + dt.regularization_loss(model)
        accelerator.backward(loss)
        if sharded:
            average_replicated_gradients(model, world)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
    save_full_adapter(model, out / f"{loop}-adapter", world)
    if world.is_main:
        record = {"distributed_type": str(accelerator.state.distributed_type), "losses": losses}
        (out / f"{loop}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


def run_all(out: Path) -> None:
    torch.set_num_threads(1)
    for loop in LOOPS:
        run_loop(loop, out)
    end_process_group()


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))

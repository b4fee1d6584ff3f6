"""Process-group set-up and the few collectives the trainer needs.

The trainer runs unchanged as one process or under `torchrun --nproc_per_node=N`: when the WORLD_SIZE
environment variable is above 1 it joins the process group (gloo on CPU, nccl on CUDA) that torchrun describes.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deltatune.errors import TrainingError


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup_world(device: str | None = None) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (once per process) and pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if size > 1 and not dist.is_initialized():
        _init_process_group(chosen)
    if dist.is_initialized():
        return World(dist.get_rank(), local_rank, dist.get_world_size(), chosen)
    return World(0, 0, 1, chosen)


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_process_group(device: torch.device) -> None:
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise TrainingError(f"WORLD_SIZE>1 but {', '.join(missing)} is not set; launch with "
                            "`torchrun --nproc_per_node=N script.py` or unset WORLD_SIZE")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(leave_process_group)


EXIT_BARRIER_SECONDS = 60


def leave_process_group() -> None:
    """Wait for the other processes, then leave the process group (at exit, registered by `setup_world`; call
    it at the end of a script whose group something else created, e.g. accelerate's).

    Without the barrier, a process that finished its last collective first (the root of a broadcast) tore its
    gloo connections down while a peer was still receiving, and the peer aborted ("terminate called without an
    active exception": 1 torchrun launch in 5 of tests/train/fsdp_trainer_worker.py; 0 in 10 with it). Bounded:
    a peer that died does not keep this process waiting."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):  # a peer that failed: leave anyway, its error is the one to read
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_SECONDS))
        else:
            dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(values: Tensor, world: World) -> Tensor:
    """Sum `values` over processes (a copy; the input is untouched)."""
    total = values.clone()
    if world.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every process's `value`, in rank order (only between our own processes: uses pickle over the wire)."""
    if not world.distributed:
        return [value]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's `value` on every process."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_writes(world: World, write: Callable[[], Any], what: str) -> Path:
    """Collective: rank 0 runs `write` (which returns the path it wrote); every process gets that path. When
    rank 0 fails, it re-raises its own error and every other process raises a TrainingError that says so
    (`what`: the action, e.g. "write the checkpoint"), instead of waiting forever for a file."""
    outcome: tuple[str, str] = ("ok", "")
    if world.is_main:
        try:
            outcome = ("ok", str(write()))
        except Exception as error:  # tell the other processes, then raise here
            broadcast_object(("error", str(error)), world)
            raise
    status, detail = broadcast_object(outcome, world)
    if status == "error":
        raise TrainingError(f"rank 0 failed to {what} ({detail}); see its log")
    return Path(detail)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


REPLICATED_ATTRIBUTE = "_deltatune_replicated_parameters"


def shard_model(model: nn.Module) -> nn.Module:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`): every block of every
    `nn.ModuleList` / `nn.Sequential` child that holds parameters is one FSDP unit, then the root.

    A frozen base and trainable deltas may share a unit: FSDP2 shards each parameter on its own and keeps
    requires_grad per parameter. Scalar (0-dim) parameters (LoLDU's scale, SNELLA's mixing weight) cannot be
    sharded: they stay whole on every process, outside FSDP, and `average_replicated_gradients` averages their
    gradients (the Trainer calls it; a plain loop calls it after backward). `TrainConfig(sharding="fsdp")`
    makes the Trainer use this. Needs an initialized process group (torchrun).
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise TrainingError("shard_model needs a process group; launch with `torchrun --nproc_per_node=N` and "
                            "call deltatune.train.distributed.setup_world() first")
    scalars = {parameter for parameter in model.parameters() if parameter.dim() == 0}
    for block in _blocks(model):
        fully_shard(block, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)
    setattr(model, REPLICATED_ATTRIBUTE, [p for p in model.parameters() if any(p is s for s in scalars)])
    return model


def average_replicated_gradients(model: nn.Module, world: World) -> None:
    """Average, over processes, the gradients of the parameters `shard_model` left whole (FSDP reduces the
    sharded ones itself). A collective; nothing to do for a model `shard_model` did not shard."""
    replicated = [p for p in getattr(model, REPLICATED_ATTRIBUTE, []) if p.requires_grad]
    if not world.distributed or not replicated:
        return
    # A parameter without a gradient on this process still takes part, with zeros, to keep the collective whole.
    for parameter in replicated:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.stack([p.grad.reshape(()) for p in replicated])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for parameter, total in zip(replicated, flat / world.size):
        parameter.grad.copy_(total)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's module lists that hold parameters (transformer layers, residual blocks)."""
    found = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and module is not model:
            found.extend(child for child in module.children() if any(True for _ in child.parameters()))
    return [block for block in found if not any(block is not other and _contains(other, block) for other in found)]


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


def gather_trainable(model: nn.Module) -> dict[str, Tensor]:
    """Full (unsharded) copies of the trainable parameters of a `shard_model` model, on every process (a
    collective: every rank must call it). Load them into an unsharded model of the same adapters with
    `load_state_dict(strict=False)` to save a complete adapter with `deltatune.save_adapter`, or save from the
    sharded model directly with `deltatune.train.sharding.save_full_adapter`."""
    gathered = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            gathered[name] = full.detach().clone()
    return gathered

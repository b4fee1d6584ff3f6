"""A trainer's state (`Trainer.state_dict()`) into a checkpoint folder, and back, for an exact continuation.

Exact means: the resumed run reads the same next batch, starts from the same parameters, optimizer and
scheduler state, callback decisions and RNG states (every process's), so it ends with the same parameters as a
run that never stopped.

This module knows the file layout and the run's identity (config, world, data size); it never sees the Trainer.
The trainer state it reads and writes is the dict of `Trainer.state_dict()`:

    {"progress": TrainingProgress.state_dict(), "model": {name: tensor}, "optimizer": ..., "scheduler": ...,
     "callbacks": {callback_key: callback.state_dict()}}

In trainer_state.json the progress keys sit at the top level, beside the checks of `_check_compatible` and
the encoded callback states, as they always have (checkpoint format version 1).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.errors import TrainingError
from deltatune.train.checkpoint import (
    Checkpoint,
    checkpoints_root,
    latest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from deltatune.train.config import TrainConfig
from deltatune.train.data_order import permutation_seed
from deltatune.train.distributed import World, gather_objects, main_writes
from deltatune.train.progress import STATE_KEYS
from deltatune.train.seeding import capture_rng_state, restore_rng_state
from deltatune.train.serialize import decode, encode

# Settings that fix which examples form each step: a resumed run must keep them.
DATA_ORDER_FIELDS = ("batch_size", "seed")

TrainerState = dict[str, Any]


def save(trainer_state: Callable[[], TrainerState], config: TrainConfig, world: World, num_examples: int) -> Path:
    """Collective: every process hands in its RNG state and calls `trainer_state()` (a sharded model gathers its
    full tensors there), rank 0 writes, every process gets the path."""
    rng_states = gather_objects(capture_rng_state(), world)
    state = trainer_state()
    return main_writes(world, lambda: _write(state, config, world, num_examples, rng_states), "write the checkpoint")


def _write(trainer_state: TrainerState, config: TrainConfig, world: World, num_examples: int,
           rng_states: list[tuple[dict[str, Any], dict[str, Any]]]) -> Path:
    tensors: dict[str, Any] = {}
    callbacks = {key: encode(state, f"callbacks.{key}", tensors)
                 for key, state in trainer_state["callbacks"].items()}
    for rank, (_, rng_tensors) in enumerate(rng_states):
        tensors.update({f"rng.rank{rank}.{name}": tensor for name, tensor in rng_tensors.items()})
    progress = trainer_state["progress"]
    state = {
        **progress, "permutation_seed": permutation_seed(config.seed, progress["epoch"]),
        "num_examples": num_examples, "world_size": world.size, "config": config.to_dict(), "callbacks": callbacks,
        "rng": [plain for plain, _ in rng_states],
    }
    checkpoint = Checkpoint(trainer_state["model"], trainer_state["optimizer"], trainer_state["scheduler"], state,
                            tensors)
    return write_checkpoint(checkpoints_root(config.output_dir), progress["global_step"], checkpoint,
                            config.keep_last)


def restore_latest(config: TrainConfig, world: World, num_examples: int,
                   load: Callable[[TrainerState, str], None]) -> Path | None:
    """Read the newest checkpoint, check it fits this run, hand its trainer state to `load(state, source)`
    (source names the folder for errors), then restore this process's RNG; the folder, or None (a fresh start)
    when there is none."""
    root = checkpoints_root(config.output_dir)
    folder = latest_checkpoint(root)
    if folder is None:
        if world.is_main:
            warnings.warn(f"resume=True but {root} holds no checkpoint; starting from step 0", stacklevel=3)
        return None
    checkpoint = read_checkpoint(folder, world.device)
    _check_compatible(config, num_examples, checkpoint.state, folder)
    load(trainer_state(checkpoint), f"checkpoint {folder}")
    _restore_rng(world.rank, checkpoint)
    return folder


def trainer_state(checkpoint: Checkpoint) -> TrainerState:
    """The `Trainer.state_dict()` a checkpoint holds (callback states decoded)."""
    state = checkpoint.state
    return {
        "progress": {key: state[key] for key in STATE_KEYS if key in state},
        "model": checkpoint.model, "optimizer": checkpoint.optimizer, "scheduler": checkpoint.scheduler,
        "callbacks": {key: decode(value, checkpoint.tensors) for key, value in state["callbacks"].items()},
    }


def _check_compatible(config: TrainConfig, num_examples: int, state: dict[str, Any], folder: Path) -> None:
    for name in DATA_ORDER_FIELDS:
        saved, now = state["config"][name], getattr(config, name)
        if saved != now:
            raise TrainingError(f"{name}={now} differs from the checkpoint's {name}={saved} ({folder}); keep it "
                                "to resume exactly, or start a new output_dir")
    if state["num_examples"] != num_examples:
        raise TrainingError(f"the training set has {num_examples} examples but the checkpoint "
                            f"{folder} was trained on {state['num_examples']}; resume with the same data")


def _restore_rng(rank: int, checkpoint: Checkpoint) -> None:
    saved = checkpoint.state["rng"]
    if rank >= len(saved):
        warnings.warn(f"the checkpoint has RNG states for {len(saved)} processes, not for rank {rank}; "
                      "this process keeps its fresh seed (dropout masks differ from an uninterrupted run)",
                      stacklevel=3)
        return
    prefix = f"rng.rank{rank}."
    tensors = {key[len(prefix):]: t for key, t in checkpoint.tensors.items() if key.startswith(prefix)}
    restore_rng_state(saved[rank], tensors)

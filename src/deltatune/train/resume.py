"""Saving a trainer's full state into a checkpoint, and putting it back for an exact continuation.

Exact means: the resumed run reads the same next batch, starts from the same parameters, optimizer and
scheduler state, callback decisions and RNG states (every process's), so it ends with the same parameters as a
run that never stopped.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.errors import TrainingError
from deltatune.train.callbacks import callback_key, callback_states, is_stateful
from deltatune.train.checkpoint import (
    Checkpoint, checkpoints_root, latest_checkpoint, load_trainable_tensors, read_checkpoint, trainable_tensors,
    write_checkpoint,
)
from deltatune.train.data_order import permutation_seed
from deltatune.train.distributed import broadcast_object, gather_objects
from deltatune.train.seeding import capture_rng_state, restore_rng_state
from deltatune.train.serialize import decode, encode

if TYPE_CHECKING:
    from deltatune.train.trainer import Trainer

# Settings that fix which examples form each step: a resumed run must keep them.
DATA_ORDER_FIELDS = ("batch_size", "seed")


def save(trainer: Trainer) -> Path:
    """Collective: every process hands in its RNG state, rank 0 writes, every process gets the path."""
    rng_states = gather_objects(capture_rng_state(), trainer.world)
    outcome: tuple[str, str] = ("ok", "")
    if trainer.world.is_main:
        try:
            outcome = ("ok", str(_write(trainer, rng_states)))
        except Exception as error:  # tell the other processes, then raise here
            broadcast_object(("error", str(error)), trainer.world)
            raise
    status, detail = broadcast_object(outcome, trainer.world)
    if status == "error":
        raise TrainingError(f"rank 0 failed to write the checkpoint ({detail}); see its log")
    return Path(detail)


def _write(trainer: Trainer, rng_states: list[tuple[dict[str, Any], dict[str, Any]]]) -> Path:
    tensors: dict[str, Any] = {}
    callbacks = {key: encode(state, f"callbacks.{key}", tensors)
                 for key, state in callback_states(trainer.callbacks).items()}
    for rank, (_, rng_tensors) in enumerate(rng_states):
        tensors.update({f"rng.rank{rank}.{name}": tensor for name, tensor in rng_tensors.items()})
    state = {
        "global_step": trainer.global_step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
        "permutation_seed": permutation_seed(trainer.config.seed, trainer.epoch),
        "num_examples": len(trainer.train_dataset), "world_size": trainer.world.size,
        "last_eval_step": trainer._last_eval_step, "config": trainer.config.to_dict(), "callbacks": callbacks,
        "interval": trainer._interval.state_dict(),
        "rng": [plain for plain, _ in rng_states],
    }
    checkpoint = Checkpoint(trainable_tensors(trainer.model), trainer.optimizer.state_dict(),
                            trainer.scheduler.state_dict(), state, tensors)
    root = checkpoints_root(trainer.config.output_dir)
    return write_checkpoint(root, trainer.global_step, checkpoint, trainer.config.keep_last)


def restore_latest(trainer: Trainer) -> bool:
    """Load the newest checkpoint into `trainer`; False (a fresh start) when there is none."""
    folder = latest_checkpoint(checkpoints_root(trainer.config.output_dir))
    if folder is None:
        if trainer.world.is_main:
            warnings.warn(f"resume=True but {checkpoints_root(trainer.config.output_dir)} holds no checkpoint; "
                          "starting from step 0", stacklevel=3)
        return False
    checkpoint = read_checkpoint(folder, trainer.world.device)
    _check_compatible(trainer, checkpoint.state, folder)
    load_trainable_tensors(trainer.model, checkpoint.model, folder)
    trainer.optimizer.load_state_dict(checkpoint.optimizer)
    trainer.scheduler.load_state_dict(checkpoint.scheduler)
    _restore_callbacks(trainer, checkpoint, folder)
    _restore_position(trainer, checkpoint.state)
    _restore_rng(trainer, checkpoint)
    trainer.last_checkpoint = folder
    trainer._last_saved_step = trainer.global_step
    return True


def _check_compatible(trainer: Trainer, state: dict[str, Any], folder: Path) -> None:
    for name in DATA_ORDER_FIELDS:
        saved, now = state["config"][name], getattr(trainer.config, name)
        if saved != now:
            raise TrainingError(f"{name}={now} differs from the checkpoint's {name}={saved} ({folder}); keep it "
                                "to resume exactly, or start a new output_dir")
    if state["num_examples"] != len(trainer.train_dataset):
        raise TrainingError(f"the training set has {len(trainer.train_dataset)} examples but the checkpoint "
                            f"{folder} was trained on {state['num_examples']}; resume with the same data")


def _restore_callbacks(trainer: Trainer, checkpoint: Checkpoint, folder: Path) -> None:
    saved = checkpoint.state["callbacks"]
    current = {callback_key(i, c): c for i, c in enumerate(trainer.callbacks) if is_stateful(c)}
    if set(saved) != set(current):
        raise TrainingError(f"checkpoint {folder} holds callback states {sorted(saved)} but the trainer has "
                            f"{sorted(current)}; pass the same callbacks, in the same order, to resume")
    for key, callback in current.items():
        callback.load_state_dict(decode(saved[key], checkpoint.tensors))


def _restore_position(trainer: Trainer, state: dict[str, Any]) -> None:
    trainer.global_step = int(state["global_step"])
    trainer.epoch = int(state["epoch"])
    trainer.batch_in_epoch = int(state["batch_in_epoch"])
    trainer._last_eval_step = state.get("last_eval_step")
    if "interval" in state:  # checkpoints written before it was kept: the next record averages fewer steps
        trainer._interval.load_state_dict(state["interval"])


def _restore_rng(trainer: Trainer, checkpoint: Checkpoint) -> None:
    rank, saved = trainer.world.rank, checkpoint.state["rng"]
    if rank >= len(saved):
        warnings.warn(f"the checkpoint has RNG states for {len(saved)} processes, not for rank {rank}; "
                      "this process keeps its fresh seed (dropout masks differ from an uninterrupted run)",
                      stacklevel=3)
        return
    prefix = f"rng.rank{rank}."
    tensors = {key[len(prefix):]: t for key, t in checkpoint.tensors.items() if key.startswith(prefix)}
    restore_rng_state(saved[rank], tensors)

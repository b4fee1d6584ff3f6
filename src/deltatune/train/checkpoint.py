"""Training checkpoints: one folder per step, written atomically, the last `keep_last` kept.

    output_dir/checkpoints/step-000120/
        model.safetensors      trainable tensors (+ buffers) under the model's state-dict keys
        optimizer.pt           {"optimizer": ..., "scheduler": ...}; written by us, read with weights_only=True
        state.safetensors      RNG tensors of every process and the tensors inside callback states
        trainer_state.json     step, data position, config, callback states, python/numpy RNG states

A folder exists under its final name only when complete (`deltatune.core.atomic.atomic_directory`).
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deltatune.core.atomic import atomic_directory
from deltatune.errors import AdapterFileError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "trainer_state.json"
STEP_PATTERN = re.compile(r"^step-(\d+)$")
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """Everything a resumed run needs. `state` is JSON-ready; `tensors` holds RNG and callback tensors."""

    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: dict[str, Any]
    tensors: dict[str, Tensor]


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_folder(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (staging folders start with '.' and never match)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_PATTERN.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def write_checkpoint(root: Path, step: int, checkpoint: Checkpoint, keep_last: int) -> Path:
    """Write `checkpoint` as step folder `step` (atomically), then delete all but the newest `keep_last`."""
    target = step_folder(root, step)
    with atomic_directory(target) as staging:
        save_file(_storable(checkpoint.model), str(staging / MODEL_FILE))
        save_file(_storable(checkpoint.tensors), str(staging / TENSORS_FILE))
        # Through a Python file object, so a full disk surfaces as an OSError (a path gives a bare RuntimeError).
        with open(staging / OPTIMIZER_FILE, "wb") as handle:
            torch.save({"optimizer": checkpoint.optimizer, "scheduler": checkpoint.scheduler}, handle)
        state = {"format_version": FORMAT_VERSION, **checkpoint.state}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    prune_checkpoints(root, keep_last)
    return target


def prune_checkpoints(root: Path, keep_last: int) -> None:
    for _, folder in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def read_checkpoint(folder: Path, device: torch.device | None = None) -> Checkpoint:
    """Load a folder written by `write_checkpoint`; never unpickles (optimizer.pt is read weights-only)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        model = load_file(str(folder / MODEL_FILE))
        tensors = load_file(str(folder / TENSORS_FILE))
        states = torch.load(folder / OPTIMIZER_FILE, map_location=device, weights_only=True)
        return Checkpoint(model, states["optimizer"], states["scheduler"], state, tensors)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterFileError(f"checkpoint {folder} is unreadable ({first_line}); delete it to resume from the "
                               "previous one, or start without resume") from None


def _storable(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage, e.g. tied weights)."""
    seen: set[tuple[int, int]] = set()
    result = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        result[key] = tensor.clone() if storage in seen or tensor.numel() == 0 else tensor
        seen.add(storage)
    return result


def trainable_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a checkpoint keeps: trainable parameters and delta tensors (deltatune.core when installed,
    else every parameter with requires_grad), plus the model's persistent buffers (e.g. BatchNorm statistics)."""
    try:
        from deltatune.core.attach import trainable_state_dict
    except ImportError:
        trainable_state_dict = None
    if trainable_state_dict is not None:
        state = dict(trainable_state_dict(model))
    else:
        state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    full = model.state_dict()
    for name, _ in model.named_buffers():
        if name in full:
            state[name] = full[name]
    return state


def load_trainable_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Copy checkpoint tensors into `model`; every trainable parameter must be there. `source` names where the
    tensors come from in errors ("checkpoint runs/a/checkpoints/step-000010")."""
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in tensors]
    if missing:
        raise AdapterFileError(f"{source} has no tensor {missing[0]!r} for a trainable parameter; "
                               "was it written for another model or adapter configuration?")
    try:
        from deltatune.core.attach import load_trainable_state_dict
    except ImportError:
        load_trainable_state_dict = None
    if load_trainable_state_dict is not None:
        load_trainable_state_dict(model, tensors)
        return
    unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise AdapterFileError(f"{source} has tensor {unexpected[0]!r} the model lacks; "
                               "was it written for another model?")

"""Shared by the distributed tests: a worker script run by two CPU processes under torchrun, and the same worker
run in this process as the one-process reference."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).resolve().parent


def run_two_processes(worker: ModuleType, out: Path) -> Path:
    """`torchrun --standalone --nproc_per_node=2 <worker> <out>` with a clean distributed environment (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(worker.__file__), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def run_in_process(worker: ModuleType, out: Path) -> Path:
    """The worker's `run_all(out)` here, restoring the torch thread count it changes."""
    threads = torch.get_num_threads()
    try:
        worker.run_all(out)
    finally:
        torch.set_num_threads(threads)
    return out


def final_checkpoint(run_dir: Path, method: str, steps: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A Trainer run's last checkpoint: its tensors and its optimizer state (a worker that failed for `method`
    wrote its one-line error to `<run_dir>/<method>.error` instead: shown as the failure)."""
    from safetensors.torch import load_file

    error = run_dir / f"{method}.error"
    assert not error.exists(), error.read_text()
    folder = run_dir / method / f"checkpoints/step-{steps:06d}"
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    return load_file(str(folder / "model.safetensors")), optimizer


def assert_same_checkpoint(sharded: tuple[dict, dict], single: tuple[dict, dict],
                           initial: dict[str, torch.Tensor], atol: float = 1e-10) -> None:
    """The sharded run's checkpoint holds full-sized tensors and optimizer state equal to the one-process run's."""
    (tensors, state), (reference, reference_state) = sharded, single
    assert tensors.keys() == reference.keys() and tensors
    for name in reference:
        assert tensors[name].shape == initial[name].shape, f"{name} is a slice, not the full tensor"
        torch.testing.assert_close(tensors[name], reference[name], atol=atol, rtol=0, msg=name)
    assert state.keys() == reference_state.keys()
    for index, entries in reference_state.items():
        for key, value in entries.items():
            torch.testing.assert_close(state[index][key], value, atol=atol, rtol=0,
                                       msg=f"optimizer state {index}.{key}")

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

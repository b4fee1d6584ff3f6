"""Run by test_fsdp_methods.py under `torchrun --nproc_per_node=2` with `TrainConfig(sharding="fsdp")`, and
in-process for the one-process reference: every registered method that adapts Linear layers, with its
paper defaults and its training schedules (`config.training_callbacks`), trains the two-block net of
fsdp_trainer_worker for 4 steps (two micro-batches each) and writes its final checkpoint. A method whose run
fails writes its one-line error to OUT_DIR/<method>.error instead (the test then shows it).

    python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp_methods_worker.py OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import deltatune as dt
from deltatune.core.layers import LINEAR
from deltatune.train import TrainConfig, Trainer
from deltatune.train.distributed import setup_world
from train.fsdp_trainer_worker import F64, TARGETS, WIDTH, Blocks
from train.trainer_toys import BlobDataset

STEPS = 4
METHODS = [entry.name for entry in dt.list_methods() if LINEAR in entry.delta_cls.layer_kinds]


def adapted(method: str) -> tuple[torch.nn.Module, dt.DeltaConfig]:
    torch.manual_seed(0)
    config = dt.config_for(method, targets=TARGETS)
    return dt.adapt(Blocks(features=WIDTH).to(F64), config), config


def train(method: str, out: Path) -> None:
    model, config = adapted(method)
    settings = TrainConfig(max_steps=STEPS, batch_size=8, grad_accum_steps=2, lr=0.05, log_every=1,
                           progress=False, sharding="fsdp", output_dir=str(out / method))
    data = BlobDataset(n=16, features=WIDTH, dtype=F64)
    Trainer(model, settings, data, callbacks=config.training_callbacks(model, STEPS)).train()


def run_all(out: Path) -> None:
    torch.set_num_threads(1)
    world = setup_world()
    for method in METHODS:
        try:
            train(method, out)
        except Exception as error:  # every process meets the same error: keep going to the next method
            if world.is_main:
                (out / f"{method}.error").write_text(f"{type(error).__name__}: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))

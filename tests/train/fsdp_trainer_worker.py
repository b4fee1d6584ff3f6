"""Run by test_fsdp_trainer.py under `torchrun --nproc_per_node=2` with `TrainConfig(sharding="fsdp")`, and
in-process (one process, no sharding) for the reference.

    python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp_trainer_worker.py OUT_DIR

Every run trains a float64 two-block net (each block one FSDP unit, the head in the root unit) with the deltatune
Trainer for 8 steps (25 examples in global batches of 8: the last step of each epoch leaves one process without
examples; two micro-batches per step; evaluation of 9 examples in batches of 2: 3 batches on one process, 2 on
the other, so the sharded forwards must run in lockstep) and writes its final checkpoint
(OUT_DIR/<run>/checkpoints/step-000008).
Runs: LoRA (+ a trainable head); LoRA stopped at step 3 and resumed; SaRA with its schedule (nuclear penalty,
progressive re-selection at step 4) straight and resumed from step 3; AdaLoRA with its rank allocator; ID³'s
unmasking. Rank 0 also saves the LoRA run's adapter with `sharding.save_full_adapter`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import deltatune as dt
from deltatune.train import TrainConfig, Trainer
from deltatune.train.distributed import setup_world
from deltatune.train.sharding import save_full_adapter
from train.trainer_toys import BlobDataset

F64 = torch.float64
WIDTH = 24
STEPS = 8


class Blocks(nn.Module):
    def __init__(self, features: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(features, WIDTH), nn.Tanh()),
                                     nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())])
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


TARGETS = ["blocks.0.0", "blocks.1.0"]
CONFIGS = {
    "lora": lambda: dt.LoRAConfig(rank=2, targets=TARGETS, extra_trainable=["head"]),
    # 30% of 24x24 = 173 entries (> 100: penalized), penalty on 24 > 4; re-selection at half of 8 steps
    "sara": lambda: dt.config_for("sara", targets=["blocks.1.0"], fraction=0.3, nuclear_weight=0.05,
                                  nuclear_min_dim=4, seed=3),
    "adalora": lambda: dt.config_for("adalora", targets=TARGETS, init_rank=4, target_rank=2, initial_warmup=1,
                                     final_warmup=2, mask_interval=1),
    "id3": lambda: dt.config_for("id3", targets=TARGETS, budget=0.1),
}
RUNS = ("lora", "lora-resumed", "sara", "sara-resumed", "adalora", "id3")


def adapted(method: str) -> tuple[nn.Module, dt.DeltaConfig]:
    torch.manual_seed(0)
    config = CONFIGS[method]()
    return dt.adapt(Blocks().to(F64), config), config


class StopAt:
    reads_full_tensors = False  # a control callback: nothing to gather

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, progress, global_step, **_):
        if global_step == self.step:
            progress.request_stop()


def train(method: str, out: Path, stop_at: int | None = None, resume: bool = False) -> Trainer:
    model, config = adapted(method)
    callbacks = [*config.training_callbacks(model, STEPS)]
    if stop_at is not None:
        callbacks.append(StopAt(stop_at))
    settings = TrainConfig(epochs=2, batch_size=8, grad_accum_steps=2, lr=0.05, warmup_steps=1, schedule="cosine",
                           log_every=1, progress=False, sharding="fsdp", output_dir=str(out), eval_batch_size=2,
                           checkpoint_every=2 if stop_at or resume else None, resume=resume)
    trainer = Trainer(model, settings, BlobDataset(n=25, dtype=F64), BlobDataset(n=9, seed=1, dtype=F64),
                      callbacks=callbacks)
    trainer.train()
    return trainer


def run_all(out: Path) -> None:
    torch.set_num_threads(1)
    world = setup_world()
    for run in RUNS:
        method = run.removesuffix("-resumed")
        if run.endswith("-resumed"):
            train(method, out / run, stop_at=3)
            trainer = train(method, out / run, resume=True)
        else:
            trainer = train(method, out / run)
        if run == "lora":
            save_full_adapter(trainer.model, out / "lora-adapter", world)


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))

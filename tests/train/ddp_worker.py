"""Run by test_distributed.py under `torchrun --nproc_per_node=2` (and in-process for the reference).

    python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py OUT_DIR

Trains (1) a plain two-layer net, (2) a LoRA-adapted net (a small trainable subset), (3) the plain net
stopped at step 3 and resumed, (4) a net with dropout, straight and resumed, (5) a net with a trainable
parameter that forward never uses (with and without find_unused_parameters); rank 0 writes each run's
trainable parameters and evaluation metrics.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import TrainingError
from deltatune.train import TrainConfig, Trainer
from deltatune.train.distributed import setup_world
from train.trainer_toys import BlobDataset, lora_net, save_trainable, small_net

F64 = torch.float64
# 25 examples in global batches of 8: the last step has one example, so one process gets none.
DATA = dict(n=25, dtype=F64)


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, progress, global_step, **_):
        if global_step == self.step:
            progress.request_stop()


def with_unused_parameter() -> nn.Module:
    model = small_net(dtype=F64)
    model.register_parameter("spare", nn.Parameter(torch.zeros(3, dtype=F64)))  # trainable, never used
    return model


def config(out: Path | None, **overrides) -> TrainConfig:
    settings = dict(epochs=2, batch_size=8, grad_accum_steps=2, lr=0.05, warmup_steps=1, schedule="cosine",
                    log_every=1, progress=False, output_dir=str(out) if out else None)
    return TrainConfig(**{**settings, **overrides})


def train(model, cfg: TrainConfig, callbacks=()) -> tuple[torch.nn.Module, dict]:
    trainer = Trainer(model, cfg, BlobDataset(**DATA), BlobDataset(n=9, seed=1, dtype=F64), callbacks=callbacks)
    result = trainer.train()
    return trainer.model, {**result.metrics, "global_step": result.global_step}


def run_all(out: Path) -> None:
    torch.set_num_threads(1)
    is_main = setup_world().is_main
    runs = {
        "plain": train(small_net(dtype=F64), config(out / "plain")),
        "lora": train(lora_net(dtype=F64), config(None)),
    }
    train(small_net(dtype=F64), config(out / "resumed", checkpoint_every=2), callbacks=[StopAt(3)])
    runs["resumed"] = train(small_net(dtype=F64), config(out / "resumed", checkpoint_every=2, resume=True))
    # With dropout the processes draw different masks; a resumed run must restore each process's RNG.
    runs["dropout"] = train(small_net(dtype=F64, dropout=0.3), config(None))
    dropout_dir = out / "dropout-resumed"
    train(small_net(dtype=F64, dropout=0.3), config(dropout_dir, checkpoint_every=2), callbacks=[StopAt(3)])
    runs["dropout-resumed"] = train(small_net(dtype=F64, dropout=0.3),
                                    config(dropout_dir, checkpoint_every=2, resume=True))
    runs["unused"] = train(with_unused_parameter(), config(None, find_unused_parameters=True))
    if is_main:
        for name, (model, metrics) in runs.items():
            save_trainable(model, str(out / f"{name}.safetensors"))
            (out / f"{name}.json").write_text(json.dumps(metrics))
    try:  # last: this run's DistributedDataParallel stops mid-way
        train(with_unused_parameter(), config(None))
        message = "no error"
    except TrainingError as error:
        message = str(error)
    if is_main:
        (out / "unused-error.txt").write_text(message)


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))

"""Learning-rate schedules: linear warm-up, then linear / cosine decay to 0 or a constant.

The multiplier follows the Hugging Face `get_*_schedule_with_warmup` functions (step s counts optimizer steps
already taken, so the first step of a warm-up runs at lr 0):

    warm-up (s < W):  s / max(1, W)
    linear:           max(0, (T - s) / max(1, T - W))
    cosine:           max(0, 0.5 * (1 + cos(pi * (s - W) / max(1, T - W))))
    constant:         1
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deltatune.errors import config_check
from deltatune.train.config import SCHEDULES


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The function step -> lr / peak lr for `schedule` over `total_steps` optimizer steps."""
    config_check(schedule in SCHEDULES, "schedule", schedule, f"one of {SCHEDULES}")
    config_check(total_steps >= 1, "total_steps", total_steps, "an integer >= 1")
    config_check(0 <= warmup_steps, "warmup_steps", warmup_steps, "an integer >= 0")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, (total_steps - step) / decay_steps)
        progress = (step - warmup_steps) / decay_steps
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step. The multiplier is a plain function, so the scheduler's
    state dict holds only numbers (safe to reload with `torch.load(weights_only=True)`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, total_steps, warmup_steps))

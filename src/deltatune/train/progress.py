"""Where a training run is: the one object the loop advances, checkpoints save and callbacks read.

    progress.global_step, progress.epoch, progress.batch_in_epoch    position (optimizer steps, data order)
    progress.total_steps, progress.steps_per_epoch                   the plan (from the config and data size)
    progress.last_eval_step, progress.last_eval_metrics              the latest evaluation
    progress.last_checkpoint, progress.last_saved_step               the latest checkpoint written or resumed
    progress.interval                                                running sums of the next log record
    progress.request_stop()                                          end after the current step (resumable)

`state_dict()` holds what a resumed run needs to continue exactly (position, last evaluated step, log sums);
its keys are those of a checkpoint's trainer_state.json, so checkpoints keep their format. The plan is not in
it: it is recomputed from the resumed run's config (max_steps may grow on resume). The RNG states are not
either: they belong to the process, and a checkpoint gathers them from every process (`deltatune.train.resume`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.errors import TrainingError
from deltatune.train.metrics_log import IntervalStats

# The state_dict keys: older checkpoints may lack the optional ones (the log sums came later).
REQUIRED_KEYS = ("global_step", "epoch", "batch_in_epoch")
OPTIONAL_KEYS = ("last_eval_step", "interval")
STATE_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS


@dataclass
class TrainingProgress:
    """The trainer's counters and memory of one run (see the module docstring)."""

    total_steps: int
    steps_per_epoch: int
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_eval_step: int | None = None
    last_eval_metrics: dict[str, float] | None = None
    last_saved_step: int | None = None
    last_checkpoint: Path | None = None
    stop_requested: bool = False
    interval: IntervalStats = field(default_factory=IntervalStats)

    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    @property
    def epoch_fraction(self) -> float:
        """Epochs done, with the current one's fraction (1.0 right after the first epoch's last step)."""
        return round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 4)

    def request_stop(self) -> None:
        """Stop after the current step (final checkpoint and evaluation still happen; resumable)."""
        self.stop_requested = True

    def step_done(self) -> None:
        self.global_step += 1

    def batch_done(self) -> bool:
        """Count one global batch of the epoch; True when it was the epoch's last."""
        self.batch_in_epoch += 1
        return self.batch_in_epoch == self.steps_per_epoch

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def evaluated(self, metrics: dict[str, float]) -> None:
        self.last_eval_step, self.last_eval_metrics = self.global_step, metrics

    def saved(self, folder: Path) -> None:
        self.last_checkpoint, self.last_saved_step = folder, self.global_step

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: numbers, None and the log sums."""
        return {"global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "last_eval_step": self.last_eval_step, "interval": self.interval.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in REQUIRED_KEYS if key not in state]
        if missing:
            raise TrainingError(f"the training progress state has no {missing[0]!r}; expected the keys "
                                f"{list(STATE_KEYS)} of TrainingProgress.state_dict()")
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        last_eval = state.get("last_eval_step")
        self.last_eval_step = None if last_eval is None else int(last_eval)
        # The metrics of that evaluation are not kept: the log already has them; a final evaluation at the
        # same step is recomputed without logging (see Trainer._final_evaluation).
        self.last_eval_metrics = None
        self.interval = IntervalStats()
        if state.get("interval") is not None:  # older checkpoints: the next record averages fewer steps
            self.interval.load_state_dict(state["interval"])

"""The metrics log (`metrics.jsonl`: one JSON record per line) and the tqdm progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from deltatune.core.atomic import atomic_write_text, write_errors

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Keeps every record in `history`; the main process also appends them to output_dir/metrics.jsonl."""

    def __init__(self, output_dir: str | None, write: bool) -> None:
        self.path = Path(output_dir) / METRICS_FILE if output_dir is not None else None
        self.writes = write and self.path is not None
        self.history: list[dict[str, Any]] = []

    def start(self, resumed_step: int | None) -> None:
        """A fresh run truncates the file; a resumed run keeps (and reloads, on every process) the records up
        to its checkpoint, dropping those a crashed run wrote after it."""
        if self.path is None:
            return
        kept = self._read() if resumed_step is not None else []
        self.history = [record for record in kept if record.get("step", 0) <= (resumed_step or 0)]
        if self.writes:
            atomic_write_text(self.path, "".join(_line(record) for record in self.history))

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.writes:
            with write_errors(self.path), self.path.open("a", encoding="utf-8") as handle:
                handle.write(_line(record))

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: nothing after it is trusted
        return records


def _line(record: dict[str, Any]) -> str:
    return json.dumps({k: _finite_or_text(v) for k, v in record.items()}) + "\n"


def _finite_or_text(value: Any) -> Any:
    """NaN and inf become strings: they are not JSON."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """A step counter; `disable=None` lets tqdm hide it when stderr is not a terminal."""
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=None if enabled else True, leave=False)


class IntervalStats:
    """Running sums between two log records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.samples, self.seconds = 0.0, 0, 0, 0.0
        self.lr, self.grad_norm = 0.0, None

    def add(self, loss: float, samples: int, seconds: float, lr: float, grad_norm: float | None) -> None:
        self.loss += loss
        self.steps += 1
        self.samples += samples
        self.seconds += seconds
        self.lr, self.grad_norm = lr, grad_norm

    def state_dict(self) -> dict[str, Any]:
        """The sums so far, for a checkpoint: a resumed run's next record then averages the same steps."""
        return {"loss": self.loss, "steps": self.steps, "samples": self.samples, "seconds": self.seconds,
                "lr": self.lr, "grad_norm": self.grad_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss, self.steps, self.samples = float(state["loss"]), int(state["steps"]), int(state["samples"])
        self.seconds, self.lr, self.grad_norm = float(state["seconds"]), float(state["lr"]), state["grad_norm"]

    def summary(self) -> dict[str, float]:
        record = {"loss": self.loss / max(1, self.steps), "lr": self.lr,
                  "samples_per_second": self.samples / self.seconds if self.seconds > 0 else 0.0}
        if self.grad_norm is not None:
            record["grad_norm"] = self.grad_norm
        self.reset()
        return record

"""Plots of budgets and allocations (matplotlib, written atomically as PNG). `deltatune inspect` calls these."""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.allocate.describe import rank_table, ranks_of
from deltatune.core.atomic import atomic_write_bytes
from deltatune.errors import DeltatuneError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise DeltatuneError("plots need matplotlib; install deltatune[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_schedule(schedule: Any, total_steps: int, path: str | os.PathLike) -> Path:
    """Line plot of the schedule's planned budget (rank units) over steps 0..total_steps, with its events."""
    plt = _pyplot()
    last = min(total_steps, getattr(schedule, "total_steps", total_steps))
    steps = list(range(0, last + 1))
    budgets = [schedule.planned_budget(step) for step in steps]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    try:
        axis.plot(steps, budgets, color="tab:blue", label="budget")
        events = [t for t in schedule.event_steps() if t <= last]
        if events:
            axis.scatter(events, [schedule.planned_budget(t) for t in events], s=10, color="tab:red",
                         label="allocation steps", zorder=3)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("total rank (budget)")
        axis.set_title(schedule.title() if hasattr(schedule, "title") else type(schedule).__name__, fontsize=9)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        return _save(figure, path)
    finally:
        plt.close(figure)


def plot_rank_heatmap(model_or_ranks: nn.Module | Mapping[str, int], path: str | os.PathLike,
                      title: str | None = None) -> Path:
    """Heat map of the allocated rank: layers (rows) × module kinds (columns), the rank written in each cell."""
    ranks = ranks_of(model_or_ranks)
    if not ranks:
        raise DeltatuneError("no rank-component adapter to plot: adapt the model with a budget-adaptive method, "
                             "or pass a mapping module path -> rank")
    layers, modules, grid = rank_table(ranks)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(1.2 + 1.1 * len(modules), 0.9 + 0.45 * len(layers)))
    try:
        image = axis.imshow(grid, cmap="viridis", aspect="auto")
        for row, values in enumerate(grid):
            for column, value in enumerate(values):
                if not math.isnan(value):
                    axis.text(column, row, f"{int(value)}", ha="center", va="center", color="white", fontsize=8)
        axis.set_xticks(range(len(modules)), labels=modules, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(layers)), labels=layers, fontsize=8)
        axis.set_xlabel("module")
        axis.set_ylabel("layer")
        total = sum(ranks.values())
        axis.set_title(title or f"allocated rank (total {total}, mean {total / len(ranks):.2f})", fontsize=9)
        figure.colorbar(image, ax=axis, label="rank")
        return _save(figure, path)
    finally:
        plt.close(figure)

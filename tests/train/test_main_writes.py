"""`distributed.main_writes`: rank 0 writes, every process gets the path; a failure on rank 0 reaches the others
as a TrainingError that names the action (the collective is replaced by a stand-in for rank 1)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune.errors import TrainingError
from deltatune.train import distributed
from deltatune.train.distributed import World, main_writes

ONE = World(0, 0, 1, torch.device("cpu"))
SECOND_OF_TWO = World(1, 1, 2, torch.device("cpu"))


def test_rank_zero_writes_and_returns_the_path(tmp_path: Path) -> None:
    target = tmp_path / "file"
    assert main_writes(ONE, lambda: target.write_text("x") and target, "write the file") == target
    assert target.read_text() == "x"


def test_rank_zero_reraises_its_own_error() -> None:
    def failing() -> Path:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        main_writes(ONE, failing, "write the file")


def test_another_rank_hears_of_rank_zeros_failure_and_never_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, world: ("error", "disk full"))

    def must_not_run() -> Path:
        raise AssertionError("only rank 0 writes")

    with pytest.raises(TrainingError, match=r"rank 0 failed to write the checkpoint \(disk full\)"):
        main_writes(SECOND_OF_TWO, must_not_run, "write the checkpoint")


def test_another_rank_gets_rank_zeros_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "broadcast_object", lambda value, world: ("ok", "/runs/checkpoint-3"))
    assert main_writes(SECOND_OF_TWO, lambda: Path("ignored"), "write") == Path("/runs/checkpoint-3")

"""The torchrun commands of the README's "More than one process or machine" section, run as written (torchrun
as `python -m torch.distributed.run --standalone`, the output folder moved into a temporary one): each saves a
complete adapter; the DDP and FSDP Trainer runs equal the one-process run (float64, 1e-10), the sharded
accelerate loop equals the same loop in one process, and `deltatune train --sharding fsdp` on two processes writes the
adapter one process writes (the digits task, float32: 1e-5)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.train import distributed_demo as demo

README = Path(__file__).resolve().parents[2] / "README.md"
PREFIX = "torchrun --nproc_per_node=2 -m deltatune.train.distributed_demo"
CLI_PREFIX = "torchrun --nproc_per_node=2 -m deltatune.cli train"


def _section_lines() -> list[str]:
    section = README.read_text().split("## More than one process or machine")[1].split("\n## ")[0]
    return [line.strip() for line in section.splitlines()]


def documented_commands() -> list[list[str]]:
    return [shlex.split(line) for line in _section_lines() if line.startswith(PREFIX)]


def documented_cli_command() -> list[str]:
    (command,) = [shlex.split(line) for line in _section_lines() if line.startswith(CLI_PREFIX)]
    return command


def _run(command: list[str], out: Path) -> Path:
    """Run a documented demo command (output folder `out`); the adapter folder."""
    stdout = _launch(command, out)
    assert "2 processes" in stdout, stdout
    return out / "adapter"


def _launch(command: list[str], out: Path) -> str:
    arguments = list(command[1:])
    arguments[arguments.index("--out") + 1] = str(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", *arguments], env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _flags(command: list[str]) -> tuple[str, str]:
    text = " ".join(command)
    loop = re.search(r"--loop (\w+)", text)
    return (loop.group(1) if loop else "trainer"), re.search(r"--sharding (\w+)", text).group(1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("commands")
    return {_flags(command): _run(command, root / "-".join(_flags(command))) for command in documented_commands()}


def _outputs(adapter: Path) -> torch.Tensor:
    torch.manual_seed(0)
    model = demo.TwoBlocks().to(torch.float64)
    dt.load_adapter(model, adapter)
    with torch.no_grad():
        return model(demo.Blobs().x[:8])


def test_the_readme_documents_ddp_fsdp_and_accelerate():
    assert {_flags(command) for command in documented_commands()} == {
        ("trainer", "ddp"), ("trainer", "fsdp"), ("accelerate", "fsdp")}


@pytest.mark.distributed
def test_the_documented_trainer_commands_equal_one_process(adapters, tmp_path):
    threads = torch.get_num_threads()
    try:
        single = demo.main(["--sharding", "fsdp", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    reference = _outputs(single)
    for sharding in ("ddp", "fsdp"):
        torch.testing.assert_close(_outputs(adapters["trainer", sharding]), reference, atol=1e-10, rtol=0)
    torch.manual_seed(0)
    assert not torch.allclose(reference, demo.TwoBlocks().to(torch.float64)(demo.Blobs().x[:8])), "nothing trained"


@pytest.mark.distributed
def test_the_documented_accelerate_command_equals_one_process(adapters, tmp_path):
    threads = torch.get_num_threads()
    try:
        single = demo.main(["--loop", "accelerate", "--sharding", "fsdp", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(_outputs(adapters["accelerate", "fsdp"]), _outputs(single), atol=1e-10, rtol=0)


@pytest.mark.distributed
def test_the_documented_cli_command_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    from deltatune.cli import main

    command = documented_cli_command()
    assert "--sharding" in command and command[command.index("--sharding") + 1] == "fsdp"
    stdout = _launch(command, tmp_path / "two")
    assert stdout.count("validation accuracy") == 2, stdout  # each of the two processes reports
    sharded = tmp_path / "two" / "adapter"
    one = command[4:]  # `train ...` in this process: one process, nothing to shard
    one[one.index("--out") + 1] = str(tmp_path / "one")
    threads = torch.get_num_threads()
    try:
        assert main(one) == 0
    finally:
        torch.set_num_threads(threads)
    two_files = load_file(str(sharded / "deltatune_adapter.safetensors"))
    one_files = load_file(str(tmp_path / "one" / "adapter" / "deltatune_adapter.safetensors"))
    assert two_files.keys() == one_files.keys() and two_files
    for name, tensor in one_files.items():  # float32 backbone: float32 tolerance
        torch.testing.assert_close(two_files[name], tensor, atol=1e-5, rtol=0, msg=name)

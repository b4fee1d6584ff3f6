"""Two processes under torchrun (DDP, gloo on CPU) train the same parameters as one process with the same
global batch, including a LoRA-adapted model, an empty shard on the last step, and a resumed run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from train import ddp_worker
from train.torchrun import run_in_process, run_two_processes


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_processes(ddp_worker, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_in_process(ddp_worker, tmp_path_factory.mktemp("single"))


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["plain", "lora", "resumed", "unused"])
def test_two_processes_match_one_process(two_process_run, one_process_run, run):
    distributed = load_file(str(two_process_run / f"{run}.safetensors"))
    single = load_file(str(one_process_run / f"{run}.safetensors"))
    assert distributed.keys() == single.keys() and distributed
    if run == "lora":
        assert all("lora" in name or name.startswith("head.") for name in single)
    start = {"lora": ddp_worker.lora_net, "unused": ddp_worker.with_unused_parameter}.get(run, ddp_worker.small_net)
    initial = dict((start() if run == "unused" else start(dtype=torch.float64)).named_parameters())
    for name in single:
        trained = not torch.equal(single[name], initial[name].detach())
        assert trained == (name != "spare"), f"{name} trained: {trained}"
        torch.testing.assert_close(distributed[name], single[name], atol=1e-10, rtol=0, msg=name)
    metrics_ddp = json.loads((two_process_run / f"{run}.json").read_text())
    metrics_single = json.loads((one_process_run / f"{run}.json").read_text())
    assert metrics_ddp.keys() == metrics_single.keys()
    assert metrics_ddp == pytest.approx(metrics_single, abs=1e-9)


@pytest.mark.distributed
def test_a_parameter_without_gradient_names_the_setting(two_process_run, one_process_run):
    message = (two_process_run / "unused-error.txt").read_text()
    assert "find_unused_parameters=True" in message and "\n" not in message
    assert (one_process_run / "unused-error.txt").read_text() == "no error"  # one process needs no DDP


@pytest.mark.distributed
def test_resume_restores_every_process_rng(two_process_run):
    straight = load_file(str(two_process_run / "dropout.safetensors"))
    resumed = load_file(str(two_process_run / "dropout-resumed.safetensors"))
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.distributed
def test_only_rank_zero_writes_and_logs_each_step_once(two_process_run, one_process_run):
    ddp_lines = (two_process_run / "plain" / "metrics.jsonl").read_text().splitlines()
    single_lines = (one_process_run / "plain" / "metrics.jsonl").read_text().splitlines()
    ddp_records, single_records = [json.loads(x) for x in ddp_lines], [json.loads(x) for x in single_lines]
    assert [r["step"] for r in ddp_records] == [r["step"] for r in single_records]
    for ddp, single in zip(ddp_records, single_records):  # all-reduced losses are the global-batch losses
        for key in ("loss", "eval_loss", "eval_accuracy", "lr"):
            if key in single:
                assert ddp[key] == pytest.approx(single[key], abs=1e-9), key
    assert sorted(p.name for p in (two_process_run / "plain" / "checkpoints").iterdir()) == ["step-000008"]

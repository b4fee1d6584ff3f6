"""accelerate on two CPU processes (torchrun): a plain loop with accelerate's FSDP2 plugin, and a loop whose model
deltatune shards (FSDP2) while accelerate prepares the loader and optimizer. Both train a SaRA adapter with its
schedule to the one-process result (float64, 1e-10) and save a complete adapter that loads in one process.

accelerate 1.15 does not shard on CPU: its FSDP path is taken for GPU-like devices only, so with `cpu=True`
the plugin is ignored and `prepare` wraps the model with DDP (the state stays MULTI_CPU). The first test pins
that down, so it fails the day accelerate shards on CPU."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt

pytest.importorskip("accelerate")

from integrations import accelerate_fsdp_worker as worker  # noqa: E402 - needs accelerate
from train.torchrun import run_in_process, run_two_processes  # noqa: E402


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_processes(worker, tmp_path_factory.mktemp("accelerate-fsdp"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_in_process(worker, tmp_path_factory.mktemp("accelerate-single"))


def _record(run_dir, loop):
    return json.loads((run_dir / f"{loop}.json").read_text())


@pytest.mark.distributed
def test_accelerates_fsdp_plugin_falls_back_to_ddp_on_cpu(two_process_run):
    assert _record(two_process_run, "plugin")["distributed_type"] == "DistributedType.MULTI_CPU"


@pytest.mark.distributed
@pytest.mark.parametrize("loop", worker.LOOPS)
def test_the_accelerate_loop_trains_as_one_process(two_process_run, one_process_run, loop):
    losses = _record(two_process_run, loop)["losses"]
    assert len(losses) == worker.STEPS
    assert losses == pytest.approx(_record(one_process_run, loop)["losses"], abs=1e-10)
    x = worker.data().tensors[0][:5]
    outputs = []
    for run_dir in (two_process_run, one_process_run):
        torch.manual_seed(0)
        fresh = worker.Blocks().to(worker.F64)
        dt.load_adapter(fresh, run_dir / f"{loop}-adapter")
        deltas = [delta for _, _, delta in dt.iter_deltas(fresh)]
        assert deltas and all(not bool(delta.active.all()) for delta in deltas), "no re-selection was saved"
        outputs.append(fresh(x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-10, rtol=0)
    torch.manual_seed(0)
    assert not torch.allclose(outputs[1], worker.Blocks().to(worker.F64)(x)), "the adapter changed nothing"

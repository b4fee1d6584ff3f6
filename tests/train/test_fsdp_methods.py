"""Every registered method that adapts Linear layers, with its schedules, trains under the Trainer with
`sharding="fsdp"` on two processes (torchrun, gloo) to what one process trains (float64, 1e-10), and its
checkpoint holds the full tensors and the full optimizer state."""
from __future__ import annotations

import pytest
import torch

from train import fsdp_methods_worker as worker
from train.torchrun import assert_same_checkpoint, final_checkpoint, run_in_process, run_two_processes


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_processes(worker, tmp_path_factory.mktemp("fsdp-methods"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_in_process(worker, tmp_path_factory.mktemp("fsdp-methods-single"))


def test_the_sweep_covers_the_methods_with_schedules():
    assert {"lora", "dora", "sara", "adalora", "increlora", "triadaptlora", "colora", "id3", "snella",
            "loldu"} <= set(worker.METHODS)


@pytest.mark.distributed
@pytest.mark.parametrize("method", worker.METHODS)
def test_every_method_trains_sharded_as_in_one_process(two_process_run, one_process_run, method):
    sharded = final_checkpoint(two_process_run, method, worker.STEPS)
    single = final_checkpoint(one_process_run, method, worker.STEPS)
    model, _ = worker.adapted(method)
    initial = model.state_dict()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(single[0][name], initial[name]) for name in trainable), "nothing trained"
    assert_same_checkpoint(sharded, single, initial)


SCHEDULED = ("adalora", "colora", "id3", "increlora", "sara", "snella", "triadaptlora")


@pytest.mark.distributed
@pytest.mark.parametrize("method", SCHEDULED)
def test_the_schedules_decided_something_in_the_sweep(two_process_run, method):
    """The equality above covers the schedules' decisions (masks, sparsities, selections are checkpointed
    buffers) only if they changed within the sweep's steps."""
    sharded, _ = final_checkpoint(two_process_run, method, worker.STEPS)
    model, _ = worker.adapted(method)
    parameters = dict(model.named_parameters())
    decided = [name for name, tensor in model.state_dict().items()
               if name not in parameters and name in sharded and not torch.equal(sharded[name], tensor)]
    assert decided, f"{method}'s schedule changed no buffer in {worker.STEPS} steps"

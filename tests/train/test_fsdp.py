"""Two processes under torchrun, the model sharded with FSDP2 (`shard_model`, gloo on CPU), train the same
deltas as one process with the whole batch; the gathered adapter is complete and loads in one process."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from train import fsdp_worker
from train.torchrun import run_in_process, run_two_processes


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_processes(fsdp_worker, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_in_process(fsdp_worker, tmp_path_factory.mktemp("fsdp-single"))


@pytest.mark.distributed
@pytest.mark.parametrize("method", fsdp_worker.METHODS)
def test_sharded_training_matches_one_process(two_process_run, one_process_run, method):
    sharded = load_file(str(two_process_run / f"{method}.safetensors"))
    single = load_file(str(one_process_run / f"{method}.safetensors"))
    assert sharded.keys() == single.keys() and sharded
    initial = dict(fsdp_worker.adapted(method).named_parameters())
    for name in single:
        assert sharded[name].shape == initial[name].shape, f"{name} is a shard, not the full tensor"
        assert not torch.equal(single[name], initial[name].detach()), f"{name} did not train"
        torch.testing.assert_close(sharded[name], single[name], atol=1e-12, rtol=0, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("method", fsdp_worker.METHODS)
def test_the_gathered_adapter_loads_in_one_process(two_process_run, one_process_run, method):
    x, _ = fsdp_worker.batch()
    outputs = []
    for run in (two_process_run, one_process_run):
        torch.manual_seed(0)
        fresh = fsdp_worker.Blocks().double()
        dt.load_adapter(fresh, run / f"{method}-adapter")
        outputs.append(fresh(x))
    trained = fsdp_worker.adapted(method)
    trained.load_state_dict(load_file(str(one_process_run / f"{method}.safetensors")), strict=False)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(outputs[1], trained(x), atol=1e-12, rtol=0)

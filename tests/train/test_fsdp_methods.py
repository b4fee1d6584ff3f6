"""Every registered method that adapts Linear layers, with its schedules, trains under the Trainer with
`sharding="fsdp"` on two processes (torchrun, gloo) to what one process trains (float64, 1e-10), and its
checkpoint holds the full tensors and the full optimizer state."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from train import fsdp_methods_worker as worker
from train.torchrun import run_in_process, run_two_processes

FINAL = f"checkpoints/step-{worker.STEPS:06d}"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_processes(worker, tmp_path_factory.mktemp("fsdp-methods"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_in_process(worker, tmp_path_factory.mktemp("fsdp-methods-single"))


def _checkpoint(run_dir, method):
    error = run_dir / f"{method}.error"
    assert not error.exists(), error.read_text()
    folder = run_dir / method / FINAL
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    return load_file(str(folder / "model.safetensors")), optimizer


def test_the_sweep_covers_the_methods_with_schedules():
    assert {"lora", "dora", "sara", "adalora", "increlora", "triadaptlora", "colora", "id3", "snella",
            "loldu"} <= set(worker.METHODS)


@pytest.mark.distributed
@pytest.mark.parametrize("method", worker.METHODS)
def test_every_method_trains_sharded_as_in_one_process(two_process_run, one_process_run, method):
    (sharded, sharded_state), (single, single_state) = (_checkpoint(two_process_run, method),
                                                        _checkpoint(one_process_run, method))
    model, _ = worker.adapted(method)
    initial = model.state_dict()
    assert sharded.keys() == single.keys() and sharded
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(single[name], initial[name]) for name in trainable), "nothing trained"
    for name in single:
        assert sharded[name].shape == initial[name].shape, f"{name} is a slice, not the full tensor"
        torch.testing.assert_close(sharded[name], single[name], atol=1e-10, rtol=0, msg=name)
    assert sharded_state.keys() == single_state.keys()
    for index, state in single_state.items():
        for key, value in state.items():
            torch.testing.assert_close(sharded_state[index][key], value, atol=1e-10, rtol=0,
                                       msg=f"optimizer state {index}.{key}")


SCHEDULED = ("adalora", "colora", "id3", "increlora", "sara", "snella", "triadaptlora")


@pytest.mark.distributed
@pytest.mark.parametrize("method", SCHEDULED)
def test_the_schedules_decided_something_in_the_sweep(two_process_run, method):
    """The equality above covers the schedules' decisions (masks, sparsities, selections are checkpointed
    buffers) only if they changed within the sweep's steps."""
    sharded, _ = _checkpoint(two_process_run, method)
    model, _ = worker.adapted(method)
    parameters = dict(model.named_parameters())
    decided = [name for name, tensor in model.state_dict().items()
               if name not in parameters and name in sharded and not torch.equal(sharded[name], tensor)]
    assert decided, f"{method}'s schedule changed no buffer in {worker.STEPS} steps"

"""Every registered method that acts on whole modules (layer kind MODULE: prompt tuning, VPT, IAA's aside
modules) trains under the Trainer with `sharding="fsdp"` on two processes (torchrun, gloo) to what one process
trains (float64, 1e-10), its module-hosted tensors (the prompts, the aside adapters) are sharded and move, and
its checkpoint holds the full tensors and the full optimizer state. The Linear-layer methods have their own
sweep (test_fsdp_methods.py); one launch here covers these three."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.layers import MODULE
from train import fsdp_prompts_worker as worker
from train.torchrun import assert_same_checkpoint, final_checkpoint, run_in_process, run_two_processes


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_processes(worker, tmp_path_factory.mktemp("fsdp-prompts"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_in_process(worker, tmp_path_factory.mktemp("fsdp-prompts-single"))


def test_the_sweep_covers_every_method_that_acts_on_whole_modules():
    assert set(worker.METHODS) == {e.name for e in dt.list_methods() if MODULE in e.delta_cls.layer_kinds}


@pytest.mark.distributed
@pytest.mark.parametrize("method", worker.METHODS)
def test_module_deltas_train_sharded_as_in_one_process(two_process_run, one_process_run, method):
    sharded = final_checkpoint(two_process_run, method, worker.STEPS)
    single, single_state = final_checkpoint(one_process_run, method, worker.STEPS)
    model, _ = worker.adapted(method)
    initial = model.state_dict()
    hosted = worker.on_modules(method, [name for name, p in model.named_parameters() if p.requires_grad])
    assert hosted and all(name in single for name in hosted)
    sharded_names = (two_process_run / f"{method}.sharded").read_text().split()
    assert set(hosted) <= set(sharded_names), f"FSDP left them whole: {set(hosted) - set(sharded_names)}"
    assert not (one_process_run / f"{method}.sharded").read_text(), "the one-process reference was sharded"
    for name in hosted:
        assert not torch.allclose(single[name], initial[name], rtol=0, atol=1e-6), f"{name} did not train"
    assert len(single_state) == sum(p.requires_grad for p in model.parameters())
    assert_same_checkpoint(sharded, (single, single_state), initial)

"""The Trainer with `TrainConfig(sharding="fsdp")` on two processes (torchrun, FSDP2 over gloo) trains what one
process trains (float64, 1e-10): LoRA with a trainable head, SaRA's schedule (nuclear penalty, progressive
re-selection), AdaLoRA's rank allocator, ID³'s unmasking; the schedules decide identically; checkpoints hold
full tensors and full optimizer state; a run stopped and resumed ends where the straight run ends; the saved
adapter is complete and loads in one process."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.train import TrainConfig
from train import fsdp_trainer_worker as worker
from train.torchrun import run_in_process, run_two_processes

FINAL = "checkpoints/step-000008"
DECISIONS = {"sara": "active", "adalora": "rank_mask", "id3": "mask"}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    return run_two_processes(worker, tmp_path_factory.mktemp("fsdp-trainer"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return run_in_process(worker, tmp_path_factory.mktemp("fsdp-trainer-single"))


def _model_file(run_dir, run):
    return load_file(str(run_dir / run / FINAL / "model.safetensors"))


def _optimizer_state(run_dir, run):
    return torch.load(run_dir / run / FINAL / "optimizer.pt", weights_only=True)["optimizer"]["state"]


@pytest.mark.distributed
@pytest.mark.parametrize("run", worker.RUNS)
def test_sharded_trainer_matches_one_process(two_process_run, one_process_run, run):
    sharded, single = _model_file(two_process_run, run), _model_file(one_process_run, run)
    assert sharded.keys() == single.keys() and sharded
    model, _ = worker.adapted(run.removesuffix("-resumed"))
    initial = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable <= sharded.keys()
    trained = {name for name in trainable if not torch.equal(single[name], initial[name])}
    # AdaLoRA may prune a module's every component (its λ stays 0); every other run trains each tensor
    assert trained == trainable or (run == "adalora" and trained), trainable - trained
    for name in single:
        assert sharded[name].shape == initial[name].shape, f"{name} is a slice, not the full tensor"
        torch.testing.assert_close(sharded[name], single[name], atol=1e-10, rtol=0, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("run", worker.RUNS)
def test_checkpointed_optimizer_state_is_whole(two_process_run, one_process_run, run):
    sharded, single = _optimizer_state(two_process_run, run), _optimizer_state(one_process_run, run)
    assert sharded.keys() == single.keys() and sharded
    for index, state in single.items():
        for key, value in state.items():
            assert sharded[index][key].shape == value.shape, f"state {index}.{key} is a slice"
            torch.testing.assert_close(sharded[index][key], value, atol=1e-10, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("method", sorted(DECISIONS))
def test_schedules_decide_as_one_process(two_process_run, one_process_run, method):
    sharded, single = _model_file(two_process_run, method), _model_file(one_process_run, method)
    model, _ = worker.adapted(method)
    initial = model.state_dict()
    decisions = [name for name in single if name.endswith(f".{DECISIONS[method]}")]
    assert decisions
    assert any(not torch.equal(single[name], initial[name]) for name in decisions), "the schedule decided nothing"
    for name in decisions:
        assert torch.equal(sharded[name], single[name]), name


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lora", "sara"])
def test_a_resumed_sharded_run_ends_on_the_straight_run(two_process_run, method):
    straight, resumed = _model_file(two_process_run, method), _model_file(two_process_run, f"{method}-resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-12, rtol=0, msg=name)
    steps = [json.loads(line)["step"] for line in
             (two_process_run / f"{method}-resumed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, worker.STEPS + 1))  # one record per step across the resume


@pytest.mark.distributed
def test_the_sharded_runs_losses_are_the_global_batch_losses(two_process_run, one_process_run):
    def losses(run_dir):
        return [json.loads(line) for line in (run_dir / "sara" / "metrics.jsonl").read_text().splitlines()]
    for sharded, single in zip(losses(two_process_run), losses(one_process_run), strict=True):
        for key in ("loss", "eval_loss", "eval_accuracy", "grad_norm"):
            if key in single:
                assert sharded[key] == pytest.approx(single[key], abs=1e-10), key


@pytest.mark.distributed
def test_the_saved_adapter_is_complete_and_loads_in_one_process(two_process_run, one_process_run):
    x = worker.BlobDataset(n=5, seed=2, dtype=worker.F64).x
    torch.manual_seed(0)
    fresh = worker.Blocks().to(worker.F64)
    dt.load_adapter(fresh, two_process_run / "lora-adapter")
    reference, _ = worker.adapted("lora")
    reference.load_state_dict(_model_file(one_process_run, "lora"), strict=False)
    torch.testing.assert_close(fresh(x), reference(x), atol=1e-10, rtol=0)


def test_fsdp_refuses_an_update_rule_it_was_not_tested_with():
    with pytest.raises(ConfigError, match="sharding='ddp'"):
        TrainConfig(sharding="fsdp", update_rule="sam")
    with pytest.raises(ConfigError, match="sharding"):
        TrainConfig(sharding="zero3")


@pytest.mark.distributed
def test_a_sharded_checkpoint_resumes_in_one_process(two_process_run, one_process_run, tmp_path):
    """The checkpoint holds full tensors in the one-process layout, so a run sharded on two processes continues
    in one (and ends on the one-process run's weights)."""
    folder = tmp_path / "lora"
    shutil.copytree(two_process_run / "lora-resumed", folder)
    shutil.rmtree(folder / FINAL)  # continue from step 6
    threads = torch.get_num_threads()
    try:
        worker.train("lora", folder, resume=True)
    finally:
        torch.set_num_threads(threads)
    def records(run_dir):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the two-process run's records up to step 6 are kept as written (timings included): this run resumed
    kept = [r for r in records(two_process_run / "lora-resumed") if r["step"] <= 6]
    assert records(folder)[:len(kept)] == kept and records(folder)[-1]["step"] == worker.STEPS
    resumed, single = _model_file(tmp_path, "lora"), _model_file(one_process_run, "lora")
    for name in single:
        torch.testing.assert_close(resumed[name], single[name], atol=1e-10, rtol=0, msg=name)

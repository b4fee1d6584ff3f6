"""Allocators on a small float64 model: budgets reached, decisions exact under merge / save / accumulation /
resume, the trainer callback, and clear errors for bad input."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from allocate.toys import Blobs, adapted, data, net, train
from deltatune.allocate import AllocationError, describe_allocation, ranks_from_tensors
from deltatune.allocate.plots import plot_rank_heatmap, plot_schedule
from deltatune.errors import ConfigError
from deltatune.methods.adalora import AdaLoRAConfig
from deltatune.methods.colora import CoLoRAConfig
from deltatune.methods.increlora import IncreLoRAConfig
from deltatune.methods.triadaptlora import TriAdaptLoRAConfig

TARGETS = ("first", "second")
STEPS = 20
CONFIGS = {
    "adalora": lambda: AdaLoRAConfig(targets=TARGETS, init_rank=6, target_rank=3, initial_warmup=2, final_warmup=6,
                                     mask_interval=2),
    "increlora": lambda: IncreLoRAConfig(targets=TARGETS, init_rank=1, target_rank=3, initial_warmup=1, interval=2,
                                         top_modules=1, restart_warmup=2),
    "triadaptlora": lambda: TriAdaptLoRAConfig(targets=TARGETS, init_rank=1, target_rank=4, interval=2),
    "colora": lambda: CoLoRAConfig(targets=TARGETS, rank=3, probe=5),
}
FINAL_TOTAL = {"adalora": 6, "increlora": 6, "triadaptlora": 8, "colora": 6}
methods = pytest.mark.parametrize("method", sorted(CONFIGS))


def _trained(method: str, steps: int = STEPS, **kwargs):
    config = CONFIGS[method]()
    model = adapted(config)
    allocator = config.allocator(model, steps)
    train(model, allocator, steps, **kwargs)
    return model, allocator, config


def _ranks(model) -> dict[str, int]:
    return {path: info["rank"] for path, info in describe_allocation(model)["default"]["modules"].items()}


@methods
def test_final_budget_equals_the_target(method):
    model, allocator, _ = _trained(method)
    assert allocator.total_rank == FINAL_TOTAL[method]
    assert describe_allocation(model)["default"]["total_rank"] == FINAL_TOTAL[method]


def test_adalora_zeroes_the_values_of_pruned_triplets_and_keeps_them_zero():
    model, _, _ = _trained("adalora")
    for _, _, delta in dt.iter_deltas(model):
        assert torch.all(delta.lora_E.reshape(-1)[~delta.rank_mask] == 0)


@methods
def test_merge_and_unmerge_are_exact_after_allocation_changed_ranks(method):
    model, _, _ = _trained(method)
    reference = net()
    x, _ = data(16, seed=3)
    expected = model(x).detach()
    dt.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    dt.unmerge(model)
    base = {k: v for k, v in model.state_dict().items() if ".deltas." not in f".{k}"}
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(base[key], value, rtol=0, atol=1e-12)


@methods
def test_save_then_load_keeps_the_allocated_ranks_and_masks(method, tmp_path):
    model, _, _ = _trained(method)
    x, _ = data(16, seed=3)
    dt.save_adapter(model, tmp_path / "adapter")
    loaded = dt.load_adapter(net(), tmp_path / "adapter")
    assert _ranks(loaded) == _ranks(model)
    for (_, _, saved), (_, _, restored) in zip(dt.iter_deltas(model), dt.iter_deltas(loaded)):
        assert torch.equal(saved.rank_mask, restored.rank_mask)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    from safetensors.torch import load_file

    assert ranks_from_tensors(load_file(str(tmp_path / "adapter" / "deltatune_adapter.safetensors"))) == _ranks(model)


@pytest.mark.parametrize("method", ["adalora", "increlora", "colora"])
def test_gradient_accumulation_gives_the_same_decisions(method):
    whole, _, _ = _trained(method, micro_batches=1)
    split, _, _ = _trained(method, micro_batches=3)
    assert _ranks(whole) == _ranks(split)
    for (key, a), (_, b) in zip(dt.adapter_state_dict(whole).items(), dt.adapter_state_dict(split).items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=key)


@methods
def test_allocator_state_dict_resumes_exactly(method):
    straight, _, _ = _trained(method)
    config = CONFIGS[method]()
    model = adapted(config)
    first = config.allocator(model, STEPS)
    train(model, first, 7)
    saved_model, saved_allocator = copy.deepcopy(dt.adapter_state_dict(model)), copy.deepcopy(first.state_dict())
    resumed = adapted(config)
    with torch.no_grad():
        for key, tensor in dt.adapter_state_dict(resumed).items():
            tensor.copy_(saved_model[key])
    second = config.allocator(resumed, STEPS)
    second.load_state_dict(saved_allocator)
    train(resumed, second, STEPS - 7, start=8)
    for key, tensor in dt.adapter_state_dict(straight).items():
        torch.testing.assert_close(dt.adapter_state_dict(resumed)[key], tensor, rtol=0, atol=1e-12, msg=key)


def _run_trainer(method: str, folder, stop_at: int | None = None, resume: bool = False):
    from deltatune.train import TrainConfig, Trainer

    config = CONFIGS[method]()
    model = adapted(config)
    callbacks = config.training_callbacks(model, 12)
    if stop_at is not None:
        callbacks.append(_StopAt(stop_at))
    settings = TrainConfig(max_steps=12, batch_size=12, lr=0.05, progress=False, seed=0, output_dir=str(folder),
                           resume=resume, checkpoint_every=3)
    Trainer(model, settings, Blobs(), callbacks=callbacks).train()
    return model, callbacks[0].allocator


class _StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, global_step, **_):
        if global_step == self.step:
            trainer.request_stop()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.mark.parametrize("method", ["adalora", "increlora"])
def test_trainer_callback_allocates_and_resumes_from_a_checkpoint(method, tmp_path):
    straight, allocator = _run_trainer(method, tmp_path / "straight")
    assert allocator.total_rank == FINAL_TOTAL[method] and allocator.last_step == 12
    _run_trainer(method, tmp_path / "stopped", stop_at=5)
    resumed, _ = _run_trainer(method, tmp_path / "stopped", stop_at=5, resume=True)
    for key, tensor in dt.adapter_state_dict(straight).items():
        torch.testing.assert_close(dt.adapter_state_dict(resumed)[key], tensor, rtol=0, atol=1e-12, msg=key)


def test_allocators_refuse_models_without_a_budget_adaptive_method():
    model = dt.adapt(net(), dt.LoRAConfig(rank=2, targets=list(TARGETS)))
    with pytest.raises(AllocationError, match="budget-adaptive method"):
        from deltatune.allocate import SensitivityPruner

        SensitivityPruner(model, target_rank=1, total_steps=10)
    with pytest.raises(AllocationError, match="no adapter named 'other'"):
        from deltatune.allocate import ContributionAllocator

        ContributionAllocator(adapted(CONFIGS["colora"]()), allocate_at=2, total_steps=10, adapter="other")


def test_steps_outside_the_run_and_missing_gradients_are_clear_errors():
    config = CONFIGS["adalora"]()
    model = adapted(config)
    allocator = config.allocator(model, 10)
    with pytest.raises(AllocationError, match="no gradient for"):
        allocator.step(model, 1)
    with pytest.raises(AllocationError, match="beyond total_steps=10"):
        allocator.step(model, 11)
    with pytest.raises(AllocationError, match="global_step=0 is invalid"):
        allocator.step(model, 0)
    with pytest.raises(AllocationError, match="different model"):
        allocator.step(net(), 1)
    grower_config = CONFIGS["increlora"]()
    grower_model = adapted(grower_config)
    grower = grower_config.allocator(grower_model, 10)
    with pytest.raises(AllocationError, match="no backward pass reached"):
        grower.step(grower_model, 1)


def test_budgets_and_schedules_that_do_not_fit_are_refused():
    with pytest.raises(ConfigError, match="target_rank=16 is invalid.*budget cannot be larger than the initial"):
        AdaLoRAConfig(init_rank=12, target_rank=16)
    with pytest.raises(ConfigError, match="target_rank=1 is invalid.*only grows"):
        IncreLoRAConfig(init_rank=2, target_rank=1)
    late = AdaLoRAConfig(targets=TARGETS, initial_warmup=50, final_warmup=60)
    with pytest.raises(ConfigError, match="initial_warmup \\+ final_warmup=110.*training length 100"):
        late.allocator(adapted(late), 100)
    config = IncreLoRAConfig(targets=TARGETS, init_rank=1, target_rank=8, interval=40, top_modules=1)
    with pytest.raises(ConfigError, match="reach beyond the training length"):
        config.allocator(adapted(config), 100)
    colora = CoLoRAConfig(targets=TARGETS, probe=30)
    with pytest.raises(ConfigError, match="allocate_at=30"):
        colora.allocator(adapted(colora), 20)


def test_describe_and_plots(tmp_path):
    model, allocator, _ = _trained("adalora")
    described = describe_allocation(model)["default"]
    assert set(described["modules"]) == set(TARGETS)
    assert described["parameters"] == sum(
        info["rank"] * (d.layer.fan_in + d.layer.out_features + 1)
        for (path, info), (_, _, d) in zip(described["modules"].items(), dt.iter_deltas(model)))
    heatmap = plot_rank_heatmap(model, tmp_path / "ranks.png")
    curve = plot_schedule(allocator.schedule, STEPS, tmp_path / "budget.png")
    for path in (heatmap, curve):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_rank_heatmap({"encoder.layer.0.attention.self.query": 3, "encoder.layer.1.output.dense": 5},
                      tmp_path / "mapping.png")


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("method", ["adalora", "increlora", "triadaptlora", "colora"])
def test_runs_shorter_than_the_schedules_warm_ups_still_allocate(method, steps):
    """`deltatune train --max-steps 2` with a method's default schedule: a run that starts in the final phase
    decides its pattern from the steps it has (AdaLoRA once crashed: no importance recorded yet)."""
    config = dt.config_for(method, targets=TARGETS)
    model = adapted(config)
    (callback,) = config.training_callbacks(model, steps)
    train(model, callback.allocator, steps)
    assert callback.allocator.last_step == steps


@pytest.mark.parametrize("method", ["adalora", "increlora", "triadaptlora", "colora"])
def test_a_one_step_run_allocates_or_is_refused_by_its_length(method):
    config = dt.config_for(method, targets=TARGETS)
    model = adapted(config)
    try:
        (callback,) = config.training_callbacks(model, 1)
    except ConfigError as error:
        assert "train longer" in str(error)
        return
    train(model, callback.allocator, 1)
    assert callback.allocator.last_step == 1

"""Grown rank components get a new parameter's optimizer state (IncreLoRA's official code adds every new
component to the optimizer as a new parameter group, so its Adam moments start at zero and its step count at 1).

Each test trains the toy model with torch's AdamW in float64, lets an allocator grow components at step GROW,
and replays every fresh slot's gradients into a freshly created nn.Parameter (same values as the slot just
after the growth) trained by torch's AdamW: the slot must follow it exactly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from allocate.toys import adapted, data
from deltatune.allocate import AllocationError
from deltatune.methods.colora import CoLoRAConfig
from deltatune.methods.increlora import IncreLoRAConfig
from deltatune.methods.triadaptlora import TriAdaptLoRAConfig
from deltatune.optim.adamr import AdamR

TARGETS = ("first", "second")
GROW, AFTER = 10, 8  # the one allocation event, then the steps compared
SETTINGS = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
CONFIGS = {
    "increlora": lambda warmup=0: IncreLoRAConfig(targets=TARGETS, init_rank=1, target_rank=3, rank_step=1,
                                                  initial_warmup=2, interval=GROW, top_modules=1,
                                                  restart_warmup=warmup),
    "triadaptlora": lambda warmup=0: TriAdaptLoRAConfig(targets=TARGETS, init_rank=1, target_rank=4, rank_step=2,
                                                        initial_warmup=2, interval=GROW),
    "colora": lambda warmup=0: CoLoRAConfig(targets=(*TARGETS, "head"), rank=3, probe=GROW),
}


def _fresh_slots(method: str, delta, live_before: torch.Tensor) -> dict[str, tuple[int, torch.Tensor]]:
    """Per component tensor, (slot dim, slots) that the growth at GROW created: the method's own record."""
    new_live = torch.nonzero(delta.rank_mask & ~live_before).reshape(-1)
    if method == "increlora":  # activated reserves: a new e; new reserves: new a, b (and their e)
        new_rows = torch.nonzero(delta.trained_since == GROW).reshape(-1)
        return {"lora_A": (0, new_rows), "lora_B": (1, new_rows),
                "lora_E": (0, torch.cat([new_live, new_rows]))}
    slots = {"lora_A": (0, new_live), "lora_B": (1, new_live)}
    if method == "triadaptlora":  # the new block: an L row strip and a U column strip
        slots.update(lora_C_lower=(0, new_live), lora_C_upper=(1, new_live))
    return slots


def _run(method: str, warmup: int = 0, schedule=None):
    """Train GROW + AFTER steps; return [(slot trajectory, reference trajectory)] for every fresh slot."""
    config = CONFIGS[method](warmup)
    model = adapted(config)
    allocator = config.allocator(model, 6 * GROW)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, **SETTINGS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) if schedule else None
    allocator.attach_optimizer(optimizer)
    x, y = data()
    generator = torch.Generator().manual_seed(0)
    references: list[tuple] = []
    for step in range(1, GROW + AFTER + 1):
        index = torch.randint(0, len(y), (24,), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index]) + dt.regularization_loss(model)
        loss.backward()
        for tensor, slot_dim, slot, reference, ref_optimizer, ref_scheduler, _ in references:
            reference.grad = tensor.grad.movedim(slot_dim, 0)[slot].clone()
            ref_optimizer.step()
            if ref_scheduler is not None:
                ref_scheduler.step()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        live = {path: delta.rank_mask.clone() for path, _, delta in dt.iter_deltas(model)}
        allocator.step(model, step)
        optimizer.zero_grad()
        for tensor, slot_dim, slot, reference, *_, trajectory in references:
            trajectory.append((tensor.detach().movedim(slot_dim, 0)[slot].clone(), reference.detach().clone()))
        if step == GROW:
            references = _references(method, model, live, warmup, schedule)
    assert references, "the allocation at GROW made no new component: the test would compare nothing"
    return [entry[-1] for entry in references]


def _references(method, model, live, warmup, schedule):
    references = []
    for path, _, delta in dt.iter_deltas(model):
        tensors = delta.component_tensors()
        for name, (slot_dim, slots) in _fresh_slots(method, delta, live[path]).items():
            tensor = tensors[name][0]
            for slot in slots.tolist():
                reference = torch.nn.Parameter(tensor.detach().movedim(slot_dim, 0)[slot].clone())
                ref_optimizer = torch.optim.AdamW([reference], **SETTINGS)
                ref_scheduler = torch.optim.lr_scheduler.LambdaLR(ref_optimizer, _reference_lr(schedule, warmup))
                references.append((tensor, slot_dim, slot, reference, ref_optimizer, ref_scheduler, []))
    return references


def _reference_lr(schedule, warmup: int):
    """The tensor's own schedule, continued from GROW; IncreLoRA's restart warm-up (from 0) on top."""

    def factor(i: int) -> float:
        continued = schedule(GROW + i) if schedule else 1.0
        return continued * (min(i / warmup, 1.0) if warmup else 1.0)

    return factor


def _assert_follow(trajectories) -> None:
    for trajectory in trajectories:
        assert len(trajectory) == AFTER
        for k, (slot, reference) in enumerate(trajectory, start=1):
            torch.testing.assert_close(slot, reference, rtol=0, atol=1e-12, msg=f"update {k} after the growth")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_grown_slot_is_trained_like_a_fresh_adamw_parameter(method):
    _assert_follow(_run(method))


@pytest.mark.parametrize("method", ["increlora", "colora"])
def test_the_learning_rate_the_optimizer_used_is_the_one_applied(method):
    """A scheduler steps between optimizer.step and allocator.step: the update uses the lr of the step taken."""
    _assert_follow(_run(method, schedule=lambda i: 0.93**i))


def test_increlora_restart_warmup_equals_a_new_parameter_group_warming_up():
    _assert_follow(_run("increlora", warmup=3))


def _plain_run(model, allocator, optimizer, steps: range, attach: bool = True) -> None:
    x, y = data()
    generator = torch.Generator().manual_seed(0)
    for _ in range(1, steps.start):
        torch.randint(0, len(y), (24,), generator=generator)
    if attach:
        allocator.attach_optimizer(optimizer)
    for step in steps:
        index = torch.randint(0, len(y), (24,), generator=generator)
        (F.cross_entropy(model(x[index]), y[index]) + dt.regularization_loss(model)).backward()
        optimizer.step()
        allocator.step(model, step)
        optimizer.zero_grad()


def _fresh_run(method: str):
    config = CONFIGS[method]()
    model = adapted(config)
    allocator = config.allocator(model, 6 * GROW)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **SETTINGS)
    return config, model, allocator, optimizer


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_the_slots_own_step_counts_resume_exactly(method):
    """Stop while grown slots are still young, restore model, optimizer and allocator, go on: bit-identical."""
    _, straight, allocator, optimizer = _fresh_run(method)
    _plain_run(straight, allocator, optimizer, range(1, GROW + AFTER + 1))
    _, model, allocator, optimizer = _fresh_run(method)
    _plain_run(model, allocator, optimizer, range(1, GROW + 3))
    saved = allocator.state_dict()
    assert any(bool((ages > 0).any()) for ages in saved["fresh_state"]["ages"].values())
    saved = copy.deepcopy(saved)
    adapter, moments = copy.deepcopy(dt.adapter_state_dict(model)), copy.deepcopy(optimizer.state_dict())
    _, resumed, allocator, optimizer = _fresh_run(method)
    with torch.no_grad():
        for key, tensor in dt.adapter_state_dict(resumed).items():
            tensor.copy_(adapter[key])
    optimizer.load_state_dict(moments)
    allocator.load_state_dict(saved)
    _plain_run(resumed, allocator, optimizer, range(GROW + 3, GROW + AFTER + 1))
    for key, tensor in dt.adapter_state_dict(straight).items():
        torch.testing.assert_close(dt.adapter_state_dict(resumed)[key], tensor, rtol=0, atol=0, msg=key)


def test_a_resumed_run_that_forgets_to_attach_the_optimizer_is_refused():
    _, model, allocator, optimizer = _fresh_run("increlora")
    _plain_run(model, allocator, optimizer, range(1, GROW + 2))
    saved = copy.deepcopy(allocator.state_dict())
    allocator.fresh.detach()  # a new process: the same optimizer state, an allocator built anew
    allocator.load_state_dict(saved)
    with pytest.raises(AllocationError, match="attach_optimizer") as caught:
        _plain_run(model, allocator, optimizer, range(GROW + 2, GROW + 3), attach=False)
    assert "\n" not in str(caught.value)


def test_an_optimizer_stepped_behind_the_hooks_is_refused():
    """Attached only after its step (as `step(..., optimizer=)` would on the first resumed step)."""
    _, model, allocator, optimizer = _fresh_run("colora")
    _plain_run(model, allocator, optimizer, range(1, GROW + 2))
    saved = copy.deepcopy(allocator.state_dict())
    allocator.fresh.detach()
    allocator.load_state_dict(saved)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    with pytest.raises(AllocationError, match="without the allocator's hooks"):
        allocator.step(model, GROW + 2, optimizer)


def test_growing_without_an_attached_optimizer_warns_once_and_shares_the_state():
    config, model, allocator, optimizer = _fresh_run("triadaptlora")
    with pytest.warns(UserWarning, match="no optimizer is attached") as record:
        _plain_run(model, allocator, optimizer, range(1, 2 * GROW + 1), attach=False)
    assert len([w for w in record if "no optimizer is attached" in str(w.message)]) == 1
    assert allocator.fresh.ages == {}


@pytest.mark.parametrize("make", [
    lambda params: AdamR(params, lr=0.01),
    lambda params: torch.optim.RMSprop(params, lr=0.01),
    lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, dampening=0.5),
], ids=["adamr", "rmsprop", "sgd-dampening"])
def test_optimizers_that_cannot_give_fresh_state_are_refused_when_attached(make):
    _, model, allocator, _ = _fresh_run("increlora")
    optimizer = make([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(AllocationError, match="fresh_optimizer_state = False") as caught:
        allocator.attach_optimizer(optimizer)
    assert type(optimizer).__name__ in str(caught.value) or "dampening" in str(caught.value)
    allocator.fresh_optimizer_state = False  # the documented way out: new slots share their tensor's state
    allocator.attach_optimizer(optimizer)
    _plain_run(model, allocator, optimizer, range(1, GROW + 2), attach=False)
    assert allocator.fresh.ages == {}


def test_sgd_momentum_of_a_new_slot_starts_from_zero():
    _, model, allocator, _ = _fresh_run("colora")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    _plain_run(model, allocator, optimizer, range(1, GROW))
    live = {path: delta.rank_mask.clone() for path, _, delta in dt.iter_deltas(model)}
    _plain_run(model, allocator, optimizer, range(GROW, GROW + 1))
    grown = 0
    for path, _, delta in dt.iter_deltas(model):
        new = torch.nonzero(delta.rank_mask & ~live[path]).reshape(-1)
        buffer = optimizer.state[delta.lora_A]["momentum_buffer"]
        assert torch.all(buffer[new] == 0) and (new.numel() == 0 or bool(buffer.abs().sum() > 0))
        grown += new.numel()
    assert grown > 0


def test_the_trainer_callback_attaches_the_trainers_optimizer(tmp_path):
    from allocate.toys import Blobs
    from deltatune.train import TrainConfig, Trainer

    config = CONFIGS["increlora"]()
    model = adapted(config)
    callbacks = config.training_callbacks(model, 6 * GROW)
    settings = TrainConfig(max_steps=GROW + 2, batch_size=12, lr=0.01, progress=False, output_dir=str(tmp_path))
    trainer = Trainer(model, settings, Blobs(), callbacks=callbacks)
    trainer.train()
    fresh = callbacks[0].allocator.fresh
    assert fresh.optimizer is trainer.optimizer and any(bool((a == 2).any()) for a in fresh.ages.values())

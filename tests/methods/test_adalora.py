"""AdaLoRA: exact agreement with peft's AdaLoRA (same init, data and schedule -> the same masks every step),
the regularizer in both forms by hand, pruning semantics and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.allocate import describe_allocation
from deltatune.errors import ConfigError
from deltatune.methods.adalora import AdaLoRAConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _pair(steps: int, tinit: int, tfinal: int, delta_t: int):
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Net().double()
    peft_model = get_peft_model(copy.deepcopy(base), AdaLoraConfig(
        target_modules=["a", "b"], init_r=6, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
        total_step=steps, lora_alpha=8, orth_reg_weight=0.0))
    config = AdaLoRAConfig(targets=["a", "b"], init_rank=6, target_rank=2, alpha=8.0, initial_warmup=tinit,
                           final_warmup=tfinal, mask_interval=delta_t, orthogonal_weight=0.0)
    ours = dt.adapt(copy.deepcopy(base), config)
    with torch.no_grad():
        for name in ("a", "b"):
            theirs, mine = peft_model.base_model.model.get_submodule(name), ours.get_submodule(name).deltas["default"]
            for tensor in ("lora_A", "lora_B", "lora_E"):
                getattr(mine, tensor).copy_(getattr(theirs, tensor)["default"])
    return peft_model, ours, config.allocator(ours, steps)


def test_same_init_data_and_schedule_give_peft_s_masks_at_every_step():
    steps = 30
    peft_model, ours, allocator = _pair(steps, tinit=4, tfinal=8, delta_t=2)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (200,), generator=generator)
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (peft_model, ours)]
    for step in range(1, steps + 1):
        index = torch.randint(0, 200, (16,), generator=generator)
        for model, optimizer in zip((peft_model, ours), optimizers):
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        allocator.step(ours, step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        for name in ("a", "b"):
            theirs = peft_model.base_model.model.get_submodule(name).lora_E["default"].detach().reshape(-1)
            mine = ours.get_submodule(name).deltas["default"].lora_E.detach().reshape(-1)
            assert torch.equal(theirs != 0, mine != 0), f"step {step}, module {name}"
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9)
    assert describe_allocation(ours)["default"]["total_rank"] == 4  # the target: 2 per module


def test_paper_regularizer_by_hand():
    model = dt.adapt(Net().double(), AdaLoRAConfig(targets=["a", "b"], init_rank=3, target_rank=2,
                                                   orthogonal_weight=0.3))
    expected = 0.0
    for _, _, delta in dt.iter_deltas(model):
        q, p = delta.lora_A.detach(), delta.lora_B.detach()
        eye = torch.eye(3, dtype=p.dtype)
        expected += ((p.T @ p - eye) ** 2).sum() + ((q @ q.T - eye) ** 2).sum()
    assert dt.regularization_loss(model).item() == pytest.approx(0.3 * float(expected), rel=1e-12)


def test_code_regularizer_is_the_mean_over_every_p_and_q_like_peft():
    config = AdaLoRAConfig(targets=["a", "b"], init_rank=3, target_rank=2, orthogonal_weight=0.5,
                           orthogonal_form="code")
    model = dt.adapt(Net().double(), config)
    config.allocator(model, 10)  # the allocator knows the adapter's size: 1 / (2 × 2 modules) per norm
    norms = []
    for _, _, delta in dt.iter_deltas(model):
        q, p = delta.lora_A.detach(), delta.lora_B.detach()
        norms += [torch.linalg.matrix_norm(q @ q.T - torch.eye(3, dtype=q.dtype)),
                  torch.linalg.matrix_norm(p.T @ p - torch.eye(3, dtype=p.dtype))]
    assert dt.regularization_loss(model).item() == pytest.approx(0.5 * float(torch.stack(norms).mean()), rel=1e-12)


def test_pruned_values_can_revive_between_masks_but_not_in_the_final_phase():
    config = AdaLoRAConfig(targets=["a"], init_rank=4, target_rank=1, initial_warmup=0, final_warmup=2,
                           mask_interval=1)
    model = dt.adapt(Net().double(), config)
    allocator = config.allocator(model, 6)
    delta = model.a.deltas["default"]
    x = torch.randn(8, 12, dtype=torch.float64)
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    for step in range(1, 7):
        model(x).square().sum().backward()
        optimizer.step()
        revived = bool((delta.lora_E.reshape(-1)[~delta.rank_mask] != 0).any())
        if step > 4:  # after the optimizer moved them, the final phase zeroes them again
            assert revived
        allocator.step(model, step)
        optimizer.zero_grad()
        assert torch.all(delta.lora_E.reshape(-1)[~delta.rank_mask] == 0)
    assert delta.rank == 1


@pytest.mark.parametrize("fields,message", [
    (dict(init_rank=0), "init_rank=0 is invalid"),
    (dict(init_rank=4, target_rank=6), "target_rank=6 is invalid.*cannot be larger than the initial rank"),
    (dict(beta1=1.0), "beta1=1.0 is invalid.*\\(0, 1\\)"),
    (dict(orthogonal_form="squared"), "orthogonal_form='squared' is invalid"),
    (dict(initial_warmup=1.5), "initial_warmup=1.5 is invalid"),
    (dict(mask_interval=0), "mask_interval=0 is invalid"),
    (dict(alpha=-1.0), "alpha=-1.0 is invalid"),
])
def test_bad_hyper_parameters_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        AdaLoRAConfig(**fields)

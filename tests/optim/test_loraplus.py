"""LoRA+: B at λ·η and A at η (λ = 16 by default), embedding factors at their own rate, groups from the capability."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.optim import create_loraplus_optimizer, loraplus_param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.relu(self.proj(self.embed(tokens))).mean(1))


def _adapted(method: str = "lora", targets=("proj",)) -> nn.Module:
    torch.manual_seed(0)
    return dt.adapt(Toy(), dt.config_for(method, rank=2, targets=list(targets), extra_trainable=("head",)))


def test_default_ratio_is_the_papers_and_groups_come_from_the_pairs() -> None:
    model = _adapted(targets=("proj", "embed"))
    groups = {g["name"]: g for g in loraplus_param_groups(model, 1e-3)}
    assert [g["name"] for g in loraplus_param_groups(model, 1e-3)][0] == "lora_A"
    assert groups["lora_A"]["lr"] == 1e-3 and groups["lora_B"]["lr"] == pytest.approx(16e-3)
    assert groups["lora_embedding"]["lr"] == 1e-6
    assert all(name.endswith("lora_A") for name in groups["lora_A"]["param_names"])
    assert all(name.endswith("lora_B") for name in groups["lora_B"]["param_names"])
    assert sorted(n.rsplit(".", 1)[-1] for n in groups["lora_embedding"]["param_names"]) == ["lora_A", "lora_B"]
    assert groups["other"]["param_names"] == ["head.weight", "head.bias"]


def test_the_step_of_b_is_ratio_times_the_step_of_a() -> None:
    """Defining equation: with SGD as the base rule, ΔB / ∇B = −λ·η and ΔA / ∇A = −η exactly."""
    model = _adapted()
    delta = next(d for _, _, d in dt.iter_deltas(model))
    with torch.no_grad():
        delta.lora_B.normal_()  # so A gets a gradient too
    optimizer = create_loraplus_optimizer(model, lr=0.01, ratio=4.0, optimizer_cls=torch.optim.SGD)
    model(torch.randint(0, 20, (4, 5))).sum().backward()
    before = {"A": delta.lora_A.detach().clone(), "B": delta.lora_B.detach().clone()}
    grads = {"A": delta.lora_A.grad.clone(), "B": delta.lora_B.grad.clone()}
    optimizer.step()
    torch.testing.assert_close(delta.lora_A.detach(), before["A"] - 0.01 * grads["A"])
    torch.testing.assert_close(delta.lora_B.detach(), before["B"] - 0.04 * grads["B"])


@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_composes_with_every_method_that_has_pairs(method: str) -> None:
    model = _adapted(method)
    optimizer = create_loraplus_optimizer(model, lr=1e-2)
    tokens, target = torch.randint(0, 20, (16, 5)), torch.randint(0, 3, (16,))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(tokens), target)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


def test_refuses_bad_ratio_and_models_without_pairs() -> None:
    with pytest.raises(ConfigError, match="ratio"):
        loraplus_param_groups(_adapted(), 1e-3, ratio=0)
    with pytest.raises(ConfigError, match=r"LoRA\+ needs a model with trainable low-rank"):
        loraplus_param_groups(dt.adapt(Toy(), dt.config_for("bitfit", targets=["proj"])), 1e-3)

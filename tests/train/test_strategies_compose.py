"""The long-tail and pruning strategies compose with delta methods: the logit-adjusted loss trains LoRA and SSF
adapters through the Trainer, the logit ensemble sums adapted models, and magnitude masks on a network's conv
weights hold while a LoRA or SSF delta trains beside them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.data.datasets import TensorDictDataset
from deltatune.train import TrainConfig, Trainer
from deltatune.train.long_tail import LogitAdjustedLoss, logit_ensemble
from deltatune.train.pruning import PrunedWeights, magnitude_masks

METHODS = ("lora", "ssf")


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def _adapted(model: nn.Module, method: str, target: str, extra: list[str]) -> nn.Module:
    torch.manual_seed(1)
    options = {"rank": 2} if method == "lora" else {}
    return dt.adapt(model, dt.config_for(method, targets=[target], extra_trainable=extra, **options))


def _long_tailed_blobs(seed: int = 0) -> TensorDictDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 36 + [1] * 9 + [2] * 3)
    centres = torch.randn(3, 4, generator=generator) * 2
    return TensorDictDataset({"x": centres[labels] + torch.randn(len(labels), 4, generator=generator),
                              "labels": labels})


def _delta_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith(("head", "conv"))}


@pytest.mark.parametrize("method", METHODS)
def test_logit_adjusted_loss_trains_a_delta_through_the_trainer(method: str) -> None:
    train = _long_tailed_blobs()
    torch.manual_seed(0)
    model = _adapted(Mlp(), method, "body", ["head"])
    before = _delta_tensors(model)
    loss_fn = LogitAdjustedLoss.from_labels(train.labels, 3)
    Trainer(model, TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False, eval_every_epoch=False),
            train, loss_fn=loss_fn).train()
    after = _delta_tensors(model)
    assert before and all(not torch.equal(before[name], after[name]) for name in before), "the delta did not train"
    with torch.no_grad():
        assert torch.isfinite(loss_fn(model(train.tensors["x"]), train.labels))


def test_logit_ensemble_sums_models_adapted_with_different_methods() -> None:
    dataset = _long_tailed_blobs(seed=1)
    models = []
    for seed, method in enumerate(METHODS):
        torch.manual_seed(seed)
        model = _adapted(Mlp(), method, "body", [])
        with torch.no_grad():  # move every delta away from its identity start, so the adapters matter
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.1 * torch.randn_like(parameter))
        models.append(model)
    with torch.no_grad():
        expected = sum(model(dataset.tensors["x"]) for model in models)
    torch.testing.assert_close(logit_ensemble(models, dataset, batch_size=5), expected)


@pytest.mark.parametrize("method", METHODS)
def test_pruning_masks_hold_while_a_delta_trains_beside_them(method: str) -> None:
    torch.manual_seed(0)
    model = _adapted(ConvNet(), method, "fc", ["conv", "head"])
    masks = magnitude_masks(model, 0.25)
    assert len(masks) == 1 and next(iter(masks)).endswith("conv")  # the conv weight, not the delta's tensors
    pruned = PrunedWeights(model, masks).attach()
    before = _delta_tensors(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 1, 6, 6, generator=generator), torch.randint(3, (16,), generator=generator)
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    pruned.check()
    after = _delta_tensors(model)
    assert before and all(not torch.equal(before[name], after[name]) for name in before), "the delta did not train"

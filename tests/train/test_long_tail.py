"""Long-tail adjustment: the logit-adjusted loss against a float64 hand computation, its uniform-prior identity,
its refusals, its use as the Trainer's loss_fn; the logit ensemble over backbones is the sum of their logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.data.datasets import TensorDictDataset
from deltatune.errors import ConfigError, TrainingError
from deltatune.train import TrainConfig, Trainer
from deltatune.train.long_tail import LogitAdjustedLoss, class_priors, logit_ensemble, model_logits

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.25]], dtype=torch.float64)
LABELS = torch.tensor([0, 2])
PRIORS = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)


def hand_logit_adjusted(logits: list[list[float]], labels: list[int], priors: list[float], tau: float) -> float:
    """−log( π_y^τ e^{z_y} / Σ_j π_j^τ e^{z_j} ), averaged over the rows, with the math module only."""
    total = 0.0
    for row, label in zip(logits, labels):
        terms = [prior ** tau * math.exp(value) for value, prior in zip(row, priors)]
        total += -math.log(terms[label] / sum(terms))
    return total / len(logits)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_loss_matches_a_float64_hand_computation(tau: float) -> None:
    loss = LogitAdjustedLoss(PRIORS, tau=tau)(LOGITS, LABELS)
    expected = hand_logit_adjusted(LOGITS.tolist(), LABELS.tolist(), PRIORS.tolist(), tau)
    assert loss.dtype == torch.float64
    assert float(loss) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(loss) != pytest.approx(float(F.cross_entropy(LOGITS, LABELS)), rel=1e-3)  # it does adjust


def test_uniform_priors_give_plain_cross_entropy() -> None:
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(1))
    uniform = LogitAdjustedLoss(torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(uniform(logits, labels), F.cross_entropy(logits, labels), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(LogitAdjustedLoss(PRIORS, tau=0.0)(LOGITS, LABELS), F.cross_entropy(LOGITS, LABELS))


def test_tail_labels_cost_more_and_gradient_is_softmax_of_adjusted_logits_minus_onehot() -> None:
    logits = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    loss_fn = LogitAdjustedLoss(PRIORS)
    head, tail = loss_fn(logits, torch.tensor([0])), loss_fn(logits, torch.tensor([2]))
    assert float(head.detach()) == pytest.approx(-math.log(0.7))  # equal logits: the adjusted softmax is π itself
    assert float(tail.detach()) == pytest.approx(-math.log(0.1))
    tail.backward()
    torch.testing.assert_close(logits.grad, (PRIORS - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))[None])


def test_priors_from_labels_are_the_frequencies_and_inputs_stay_untouched() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    before = labels.clone()
    torch.testing.assert_close(class_priors(labels, 3), torch.tensor([0.5, 1 / 6, 1 / 3], dtype=torch.float64))
    priors = PRIORS.clone()
    LogitAdjustedLoss(priors)
    assert torch.equal(labels, before) and torch.equal(priors, PRIORS)
    assert LogitAdjustedLoss.from_labels(labels, 3).tau == 1.0  # the paper's τ


@pytest.mark.parametrize("priors, match", [
    (torch.tensor([0.5, 0.5, 0.0]), "finite and > 0"),
    (torch.tensor([0.6, 0.6, -0.2]), "finite and > 0"),
    (torch.tensor([0.5, float("nan"), 0.5]), "finite and > 0"),
    (torch.tensor([3.0, 1.0, 1.0]), "sum to 5"),
    (torch.tensor([[0.5, 0.5]]), "1-D tensor"),
    (torch.tensor([1.0]), "at least 2"),
])
def test_bad_priors_are_refused(priors: torch.Tensor, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LogitAdjustedLoss(priors)


def test_bad_tau_labels_and_shapes_are_refused() -> None:
    for tau in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="tau="):
            LogitAdjustedLoss(PRIORS, tau=tau)
    with pytest.raises(ConfigError, match=r"classes \[1\] have no training example"):
        class_priors(torch.tensor([0, 0, 2]), 3)
    with pytest.raises(ConfigError, match="outside the 3 classes"):
        class_priors(torch.tensor([0, 3]), 3)
    with pytest.raises(TrainingError, match="do not fit 3 class priors"):
        LogitAdjustedLoss(PRIORS)(torch.zeros(2, 4), LABELS)
    with pytest.raises(TrainingError, match="do not fit logits"):
        LogitAdjustedLoss(PRIORS)(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def toy_split(count: int = 48, classes: int = 3, seed: int = 0) -> TensorDictDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * (count - 8) + [1] * 6 + [2] * 2)[:count] % classes
    centres = torch.randn(classes, 4, generator=generator) * 2
    return TensorDictDataset({"x": centres[labels] + torch.randn(count, 4, generator=generator), "labels": labels})


class Probe(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_loss_trains_as_the_trainers_loss_fn_and_lifts_the_tail_logits() -> None:
    train = toy_split()
    trained = {}
    for name, loss_fn in (("ce", None), ("la", LogitAdjustedLoss.from_labels(train.labels, 3))):
        model = Probe(0)
        Trainer(model, TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False, eval_every_epoch=False),
                train, loss_fn=loss_fn).train()
        trained[name] = model_logits(model, train)
    # LA asks the raw logits to beat the head prior by log(π_head / π_tail): the tail class's raw logit ends higher
    assert float(trained["la"][:, 2].mean()) > float(trained["ce"][:, 2].mean())


def test_ensemble_is_the_sum_of_the_models_logits_and_restores_training_mode() -> None:
    dataset = toy_split(count=10)
    models = [Probe(1), Probe(2), Probe(3)]
    models[1].train(False)
    expected = sum(model.linear(dataset.tensors["x"]).detach() for model in models)
    torch.testing.assert_close(logit_ensemble(models, dataset, batch_size=3), expected)
    weighted = logit_ensemble(models, dataset, weights=[1 / 3] * 3)
    torch.testing.assert_close(weighted, expected / 3)
    assert torch.equal(weighted.argmax(1), expected.argmax(1))  # uniform P(z): the same arg-max as the sum
    assert [model.training for model in models] == [True, False, True]


def test_ensemble_refusals() -> None:
    dataset = toy_split(count=4)
    with pytest.raises(ConfigError, match="at least one model"):
        logit_ensemble([], dataset)
    with pytest.raises(ConfigError, match="weights="):
        logit_ensemble([Probe(0), Probe(1)], dataset, weights=[1.0])
    with pytest.raises(ConfigError, match="weights="):
        logit_ensemble([Probe(0), Probe(1)], dataset, weights=[1.0, 0.0])

    class Wider(Probe):
        def __init__(self) -> None:
            super().__init__(0)
            self.linear = nn.Linear(4, 5)

    with pytest.raises(ConfigError, match="differ in shape"):
        logit_ensemble([Probe(0), Wider()], dataset)

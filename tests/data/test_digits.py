"""The digits task and its small networks."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from deltatune.data import DigitsConvNet, DigitsMLP, evaluate_accuracy, load_task, model_inputs
from deltatune.data.digits import read_digits, split_indices
from deltatune.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def test_shapes_range_and_split_sizes(digits):
    assert digits.num_classes == 10 and digits.label_names[3] == "3"
    assert [len(digits.train), len(digits.validation), len(digits.test)] == [1259, 179, 359]
    batch = digits.collate([digits.train[i] for i in range(6)])
    assert set(batch) == {"pixels", "labels"}
    assert batch["pixels"].shape == (6, 1, 8, 8) and batch["pixels"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    pixels = digits.train.tensors["pixels"]
    assert pixels.min() == 0.0 and pixels.max() == 1.0


def test_split_is_disjoint_complete_stratified_and_pinned():
    _, labels = read_digits()
    splits = split_indices(labels.tolist())
    every = sorted(i for indices in splits.values() for i in indices)
    assert every == list(range(1797))
    for split, share in (("test", 0.2), ("validation", 0.1)):
        per_class = torch.bincount(labels[splits[split]], minlength=10)
        assert (per_class - share * torch.bincount(labels)).abs().max() <= 0.5
    # the split is fixed forever: a change of the sampling code must not move images between splits
    assert hashlib.sha256(str(splits["test"]).encode()).hexdigest()[:16] == "68fe35bbcecc12ec"


@pytest.mark.parametrize("arch, network", [("conv", DigitsConvNet), ("mlp", DigitsMLP)])
def test_models_return_logits_and_have_a_classifier_head(digits, arch, network):
    torch.manual_seed(0)
    model = digits.build_model(arch=arch)
    assert isinstance(model, network) and isinstance(model.classifier, nn.Linear)
    batch = digits.collate([digits.test[i] for i in range(4)])
    assert model(**model_inputs(batch)).shape == (4, 10)
    assert 0.0 <= evaluate_accuracy(model, digits.test) <= 1.0


def test_conv_net_has_conv_layers_for_conv_methods(digits):
    convs = [m for m in digits.build_model().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2


def test_unknown_architecture_is_refused(digits):
    with pytest.raises(ConfigError, match="arch"):
        digits.build_model(arch="resnet")


def test_a_few_steps_of_training_learn_the_digits(digits):
    """A learnability smoke check: 3 epochs of Adam on the MLP beat chance (0.1) by far."""
    torch.manual_seed(0)
    model = digits.build_model(arch="mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(digits.train, batch_size=64, shuffle=True, collate_fn=digits.collate,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for batch in loader:
            loss = nn.functional.cross_entropy(model(**model_inputs(batch)), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert evaluate_accuracy(model, digits.validation) > 0.8

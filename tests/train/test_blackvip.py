"""BlackVIP: the black box is only ever called (no gradient, no parameter access), queries are counted, the
coordinator trains by SPSA-GC and saves / loads exactly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError, TrainingError
from deltatune.optim.spsa_gc import SPSAGC
from deltatune.train.black_box import BlackBox, BlackBoxAccessError, QueryBudgetError
from deltatune.train.blackvip import (
    Coordinator,
    CoordinatorConfig,
    FrozenEncoder,
    evaluate,
    load_coordinator,
    save_coordinator,
    shuffled_batches,
    train_blackvip,
)

IMAGE = (1, 8, 8)


class Target(nn.Module):
    """A small classifier standing in for the API's model; it records the autograd state of every call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return self.body(x)


def _encoder() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))


def _data(count: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, *IMAGE, generator=generator), torch.randint(0, 3, (count,), generator=generator)


def _coordinator(seed: int = 0) -> Coordinator:
    torch.manual_seed(seed)
    config = CoordinatorConfig(feature_dim=8, image_shape=IMAGE, source_dim=16, start_size=2, widths=(4,),
                               epsilon=0.5)
    return Coordinator(FrozenEncoder(_encoder()), config)


def _train(steps: int = 3, seed: int = 0, output: str = "probabilities"):
    target, coordinator = Target(), _coordinator(seed)
    box = BlackBox(target, output=output)
    optimizer = SPSAGC(coordinator.decoder.parameters(), a=0.05, c=0.01, perturbations=5, seed=seed)
    result = train_blackvip(coordinator, box, shuffled_batches(*_data(), batch_size=8, seed=seed), optimizer, steps)
    return target, coordinator, box, result


def test_no_gradient_and_no_update_reach_the_black_box_model():
    reference = copy.deepcopy(Target())
    target, coordinator, box, result = _train(steps=4)
    assert target.seen and all(not grad and inference for grad, inference in target.seen)
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())
    for (name, before), after in zip(reference.state_dict().items(), target.state_dict().values()):
        torch.testing.assert_close(after, before, rtol=0, atol=0, msg=name)
    # the coordinator's decoder did move: the estimate is not zero
    assert result.losses and any(p.abs().sum() > 0 for p in coordinator.decoder.parameters())


def test_outputs_are_detached_even_for_inputs_that_require_grad():
    box = BlackBox(Target())
    x = _data(4)[0].requires_grad_(True)
    outputs = box(x * 2)
    assert not outputs.requires_grad and outputs.grad_fn is None
    with pytest.raises(RuntimeError):
        outputs.sum().backward()
    assert x.grad is None


def test_the_black_box_exposes_no_parameters_or_modules():
    box = BlackBox(Target())
    assert not isinstance(box, nn.Module)
    for reader in ("parameters", "named_parameters", "state_dict", "modules"):
        with pytest.raises(BlackBoxAccessError, match="only its outputs"):
            getattr(box, reader)()
    for name in ("model", "body", "weight", "_model", "children", "train", "to", "__dict__"):
        with pytest.raises((BlackBoxAccessError, AttributeError)):
            getattr(box, name)
    with pytest.raises(DeltatuneError):
        torch.optim.SGD(box.parameters(), lr=0.1)
    assert not hasattr(box, "body")  # hasattr sees the refusal as "no such attribute"


def test_queries_are_counted_per_example_and_the_budget_is_enforced():
    target = Target()
    box = BlackBox(target, budget=10)
    box(torch.rand(3, *IMAGE))
    box(torch.rand(5, *IMAGE))
    assert (box.queries, box.calls, box.remaining()) == (8, 2, 2)
    with pytest.raises(QueryBudgetError, match="budget"):
        box(torch.rand(4, *IMAGE))
    assert (box.queries, box.calls, len(target.seen)) == (8, 2, 2)  # the refused call never ran the model


def test_training_spends_two_s_queries_per_example_per_step():
    _, _, box, result = _train(steps=3)
    assert result.queries == box.queries == 3 * 2 * 5 * 8
    assert result.steps == 3 and len(result.losses) == 3


def test_probabilities_and_logits_outputs():
    x = _data(4)[0]
    probabilities = BlackBox(Target(), output="probabilities")(x)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(4))
    torch.testing.assert_close(BlackBox(Target())(x).softmax(-1), probabilities)
    with pytest.raises(ConfigError, match="output"):
        BlackBox(Target(), output="features")


def test_only_the_decoder_trains_and_the_encoder_stays_frozen():
    encoder_before = copy.deepcopy(_coordinator().encoder.state_dict())
    _, coordinator, _, _ = _train(steps=3)
    coordinator.train()
    assert not coordinator.encoder.training and not coordinator.encoder.module.training
    for key, value in coordinator.encoder.state_dict().items():  # BatchNorm statistics included
        torch.testing.assert_close(value, encoder_before[key], rtol=0, atol=0, msg=key)
    with torch.no_grad():
        images = coordinator.prompt_images(_data(6)[0])
    assert images.shape == (6, *IMAGE) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_training_is_seeded():
    first, second = _train(steps=3, seed=5)[1], _train(steps=3, seed=5)[1]
    for a, b in zip(first.decoder.state_dict().values(), second.decoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_lowers_the_black_box_loss():
    target, coordinator = Target(), _coordinator()
    with torch.no_grad():
        target.body[3].weight.mul_(8.0)  # confident outputs, so that the prompt has a loss to move
    box = BlackBox(target, output="probabilities")
    pixels, labels = _data(48, seed=3)
    optimizer = SPSAGC(coordinator.decoder.parameters(), a=0.2, c=0.02, seed=0)
    result = train_blackvip(coordinator, box, shuffled_batches(pixels, labels, 48, seed=0), optimizer, 60)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.05
    assert evaluate(box, pixels, labels, coordinator) >= evaluate(box, pixels, labels)


def test_save_then_load_gives_identical_prompts(tmp_path):
    _, coordinator, _, _ = _train(steps=3)
    save_coordinator(coordinator, tmp_path / "coordinator")
    loaded = load_coordinator(tmp_path / "coordinator", FrozenEncoder(_encoder()))
    coordinator.eval()
    x = _data(5, seed=9)[0]
    torch.testing.assert_close(loaded.prompt_images(x), coordinator.prompt_images(x), rtol=0, atol=0)
    for key, value in coordinator.decoder.state_dict().items():  # BatchNorm running statistics too
        torch.testing.assert_close(loaded.decoder.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert loaded.config == coordinator.config
    with pytest.raises(AdapterFileError, match="no BlackVIP coordinator"):
        load_coordinator(tmp_path / "missing", _encoder())


def test_bad_shapes_and_optimizers_are_refused():
    with pytest.raises(ConfigError, match="widths"):
        CoordinatorConfig(feature_dim=8, image_shape=IMAGE, source_dim=16, widths=())
    with pytest.raises(ConfigError, match="source_dim"):
        CoordinatorConfig(feature_dim=8, image_shape=IMAGE, source_dim=18, widths=(4,))
    coordinator = Coordinator(_encoder(), CoordinatorConfig(feature_dim=5, image_shape=IMAGE, source_dim=16,
                                                            widths=(4,)))
    with pytest.raises(ConfigError, match="feature_dim=8"):
        coordinator.prompt_images(_data(2)[0])
    with pytest.raises(TrainingError, match="zeroth-order"):
        train_blackvip(_coordinator(), BlackBox(Target()), shuffled_batches(*_data(), 8),
                       torch.optim.SGD(_coordinator().decoder.parameters(), lr=0.1), 1)


def test_a_transformers_classifier_works_as_the_black_box():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_channels=1, num_labels=3)
    target = ViTForImageClassification(config)
    box = BlackBox(target, output="probabilities")  # reads the ModelOutput's logits
    coordinator = _coordinator()
    optimizer = SPSAGC(coordinator.decoder.parameters(), a=0.05, seed=0)
    result = train_blackvip(coordinator, box, shuffled_batches(*_data(), 8), optimizer, 2)
    assert result.queries == 2 * 2 * 5 * 8
    assert all(not p.requires_grad and p.grad is None for p in target.parameters())
    assert 0.0 <= evaluate(box, *_data(), coordinator) <= 1.0

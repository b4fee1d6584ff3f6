"""Every registered method on every shipped pretrained backbone: adapt, train a few steps, save -> load exact,
merge exact (float64).

The toy matrix (test_matrix.py) proves the contract per layer kind; this proves it on the real layer mixes users
meet: a ViT (attention + patch conv), a CNN with BatchNorm, a Llama causal LM, a diffusers UNet. Each backbone is
reached through one of its built-in tasks, with the task's default targets, exactly as `deltatune train` builds
it (`recipe.prepare_model`), so a method that cannot run on a backbone fails here rather than in a user's hands.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import deltatune as dt
from deltatune.data import load_task
from deltatune.data.datasets import model_inputs
from deltatune.data.glyphs import FILES_DIR
from deltatune.errors import DeltatuneError, NotMergeableError
from deltatune.recipe import prepare_model
from deltatune.train import TrainConfig, Trainer
from deltatune.train.losses import takes_labels

# SpeechAST's weights ship once `python -m deltatune.data.pretrain_speech` has run (tests/data/test_speech.py)
_SPEECH = pytest.param("speech-keywords-novel", marks=pytest.mark.skipif(
    not (FILES_DIR / "speech-ast.safetensors").is_file(), reason="files/speech-ast.safetensors not shipped yet"))
BACKBONE_TASKS = ("glyphs-novel-vit", "glyphs-novel-cnn", "gloss-generation", "diffusion-handwritten", _SPEECH)
METHODS = [entry.name for entry in dt.list_methods()]
BATCH, STEPS = 4, 20  # 20: the shortest run every growth schedule's defaults fit in
# What a method refuses on a backbone, by design, with the words its one-line message must contain. Any other
# refusal is a failure: a method that cannot run where users will run it is a bug until it is listed here.
SETUP_REFUSALS = {
    ("bitfit", "gloss-generation"): "no bias",  # Llama's projections have no bias
    ("loldu", "glyphs-novel-cnn"): "supports transformers Conv1D, nn.Linear",  # the CNN's layers are convs
    ("tlora", "glyphs-novel-cnn"): "supports transformers Conv1D, nn.Linear",  # the paper adapts linear layers
    ("sketchtune", "glyphs-novel-cnn"): "supports transformers Conv1D, nn.Linear",  # the paper sketches linears
    ("parallel_adapter", "glyphs-novel-cnn"): "supports transformers Conv1D, nn.Linear",  # x and y differ in shape
    # the default (Pfeiffer) placement is after an FFN, and the UNet's attention blocks have none
    ("bottleneck_adapter", "diffusion-handwritten"): "matched no adaptable module",
    ("parallel_adapter", "diffusion-handwritten"): "matched no adaptable module",
    ("iaa", "glyphs-novel-cnn"): "matched no adaptable module",  # no transformer blocks, no FFN
    ("iaa", "diffusion-handwritten"): "matched no adaptable module",
    # Input-side deltas need tokens: VPT a ViT's blocks, prompt tuning a module that embeds input_ids.
    ("prompt_tuning", "glyphs-novel-vit"): "no input embedding",
    ("prompt_tuning", "speech-keywords-novel"): "no input embedding",  # SpeechAST is a ViT: VPT's job
    ("prompt_tuning", "glyphs-novel-cnn"): "matched no adaptable module",
    ("prompt_tuning", "diffusion-handwritten"): "matched no adaptable module",
    ("vpt", "glyphs-novel-cnn"): "matched no adaptable module",
    ("vpt", "gloss-generation"): "use prompt_tuning for text models",
    ("vpt", "diffusion-handwritten"): "matched no adaptable module",
}
MERGE_REFUSALS = {("ssf", "gloss-generation"): "bias"}  # SSF's shift has no bias to fold into
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _task(name: str):
    return load_task(name)


def _batch(task) -> dict:
    return task.collate([task.test[i] for i in range(BATCH)])


def _outputs(model, batch: dict) -> torch.Tensor:
    """The model's output tensor on `batch` in eval mode, with torch's RNG fixed (a diffusion forward draws its
    timestep and noise from it)."""
    model.eval()
    torch.manual_seed(1234)
    inputs = batch if takes_labels(model) else model_inputs(batch)
    with torch.no_grad():
        output = model(**inputs)
    for name in ("logits", "predicted_noise"):
        if isinstance(getattr(output, name, None), torch.Tensor):
            return getattr(output, name)
    assert isinstance(output, torch.Tensor), type(output)
    return output


def _setup(task, method: str):
    """(model, callbacks) as `deltatune train` builds them, or (None, the one-line refusal)."""
    try:
        model, config = prepare_model(task, method, {}, seed=0, batch_size=BATCH)
        _outputs(copy.deepcopy(model), _batch(task))  # an input-side delta may refuse the model on its first call
        return model, config.training_callbacks(model, STEPS)
    except DeltatuneError as error:
        assert str(error) and "\n" not in str(error).strip(), str(error)
        return None, str(error)


def _fresh_base(task):
    torch.manual_seed(0)  # prepare_model seeds the same way: the same head initialisation
    return task.build_model()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task_name", BACKBONE_TASKS)
def test_method_trains_saves_loads_and_merges_on_a_pretrained_backbone(task_name, method, tmp_path):
    task = _task(task_name)
    model, callbacks = _setup(task, method)
    if (method, task_name) in SETUP_REFUSALS:
        assert model is None and SETUP_REFUSALS[method, task_name] in callbacks, callbacks
        return
    assert model is not None, f"{method} refused {task_name}: {callbacks}"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    settings = TrainConfig(max_steps=STEPS, batch_size=BATCH, lr=1e-3, progress=False, eval_every_epoch=False)
    Trainer(model, settings, task.train.subset(range(BATCH * STEPS)), None, collate_fn=task.collate,
            callbacks=callbacks).train()
    moved = [n for n, p in model.named_parameters() if ".deltas." in f".{n}" and not torch.equal(p, before[n])]
    assert moved, f"no delta parameter of {method} moved in {STEPS} steps"
    batch = _batch(task)
    expected = _outputs(model, batch)
    assert torch.isfinite(expected).all()

    dt.save_adapter(model, tmp_path / "adapter")
    loaded = dt.load_adapter(_fresh_base(task), tmp_path / "adapter")
    saved, reloaded = dt.adapter_state_dict(model), dt.adapter_state_dict(loaded)
    assert saved.keys() == reloaded.keys()
    for key, tensor in reloaded.items():
        torch.testing.assert_close(tensor, saved[key], rtol=0, atol=0)
    # Equal tensors; on the UNet's convolutions the growth allocators' outputs differ in the last float32 bits
    # (~1e-6) between the trained and the reloaded layer, whose kernels run in another order.
    scale = float(expected.abs().max()) + 1.0
    torch.testing.assert_close(_outputs(loaded, batch), expected, rtol=0, atol=1e-6 * scale)

    model64 = copy.deepcopy(model).double()
    batch64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    unmerged = _outputs(model64, batch64)
    if not dt.method_entry(method).delta_cls.mergeable:
        with pytest.raises(NotMergeableError):
            dt.merge(model64)
        return
    if (method, task_name) in MERGE_REFUSALS:
        with pytest.raises(NotMergeableError, match=MERGE_REFUSALS[method, task_name]):
            dt.merge(model64)
        return
    dt.merge(model64)
    scale = float(unmerged.abs().max()) + 1.0
    torch.testing.assert_close(_outputs(model64, batch64), unmerged, rtol=0, atol=1e-10 * scale)

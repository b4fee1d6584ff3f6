"""The recipe behind `deltatune train`: methods with a planning stage plan on training batches first."""
from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt
from deltatune.allocate.selection import largest_score_positions
from deltatune.data import load_task
from deltatune.methods.spt import plan_spt
from deltatune.recipe import build_config, finetune, prepare_model, training_batches

CONV_ONLY = {"targets": None, "layer_types": ("conv",), "structured_ratio": 0.5}  # sparse, no LoRA


@pytest.fixture(scope="module")
def digits():
    return load_task("digits")


def test_spt_through_the_recipe_is_planned_on_training_batches(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the "random placeholder positions" warning would fail the test
        model, config = prepare_model(digits, "spt", {"budget": 0.05, **CONV_ONLY}, seed=3, batch_size=16)
    assert config.is_planned() and config.sensitivity
    torch.manual_seed(3)
    expected = plan_spt(digits.build_model(), config.__class__(budget=0.05, extra_trainable=("classifier",),
                                                               **CONV_ONLY), training_batches(digits, 16, 3))
    assert expected.allocation == config.allocation
    sparse = [(path, delta) for path, _, delta in dt.iter_deltas(model) if not delta.is_structured]
    assert sparse
    for path, delta in sparse:
        top = largest_score_positions(delta.layer.to_matrix(config.sensitivity[path]), delta.values.numel())
        assert torch.equal(delta.indices.sort().values, top.sort().values)


def test_training_batches_are_seeded_and_cover_the_split_once(digits):
    first = list(training_batches(digits, 100, 0))
    again = list(training_batches(digits, 100, 0))
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, again))
    assert sum(len(b["labels"]) for b in first) == len(digits.train)
    assert not torch.equal(next(training_batches(digits, 100, 1))["labels"], first[0]["labels"])


def test_finetune_runs_a_planned_method_end_to_end(tmp_path):
    result = finetune("digits", "spt", {"budget": 0.05, **CONV_ONLY}, max_steps=3, batch_size=16, lr=1e-2,
                      progress=False, out_dir=tmp_path)
    assert 0.0 <= result.test_accuracy <= 1.0 and result.adapter_path.exists()


def test_a_tasks_default_targets_decide_what_is_adapted_not_its_name(digits):
    from dataclasses import replace

    assert digits.default_targets is None
    method_default = dt.config_for("lora").targets
    assert build_config("lora", {}, digits).targets == method_default
    with_targets = replace(digits, default_targets=("conv1", "conv2"))
    assert build_config("lora", {}, with_targets).targets == ("conv1", "conv2")
    assert build_config("lora", {"targets": ("classifier",)}, with_targets).targets == ("classifier",)
    assert build_config("lora", {}, replace(digits, name="wordnet-like")).targets == method_default
    assert build_config("lora", {}, with_targets).extra_trainable == ("classifier",)


def test_evaluation_subsets_are_fixed_stratified_and_optional():
    from deltatune.data import load_task
    from deltatune.recipe import evaluation_subsets

    task = load_task("digits")
    cut = evaluation_subsets(task, 50, 100)
    assert (len(cut.validation), len(cut.test), len(cut.train)) == (50, 100, len(task.train))
    assert sorted(set(cut.test.labels.tolist())) == list(range(10))  # every class kept
    again = evaluation_subsets(load_task("digits", seed=3), 50, 100)  # the run's seed does not move them
    assert torch.equal(again.test.labels, cut.test.labels)
    assert torch.equal(again.test.tensors["pixels"], cut.test.tensors["pixels"])
    whole = evaluation_subsets(task, None, len(task.test) + 5)  # None and oversize keep the split
    assert whole.validation is task.validation and whole.test is task.test

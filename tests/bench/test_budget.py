"""Budget matching: every registered method's declared knob is searched to a target trainable count."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from deltatune.bench.budget import TOLERANCE, BudgetMatch, adapter_count, budget_field, match_budget, task_counter
from deltatune.core.layers import MODULE
from deltatune.core.registry import list_methods
from deltatune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
TOY_TARGETS = {"targets": ("hidden", "inner")}
# The toy is an MLP: input-side methods (layer kind MODULE: prompt tokens) have no token sequence to act on here.
KNOBBED = [e.name for e in list_methods()
           if e.config_cls.budget_field is not None and MODULE not in e.delta_cls.layer_kinds]


class Toy(nn.Module):
    """A small MLP on the digits pixels, with layers wide enough for every method's default rank."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.hidden, self.inner, self.classifier = nn.Linear(64, 96), nn.Linear(96, 96), nn.Linear(96, num_classes)

    def forward(self, pixels):
        return self.classifier(torch.relu(self.inner(torch.relu(self.hidden(pixels.flatten(1))))))


@pytest.fixture(scope="module")
def toy():
    from deltatune.data import load_task

    return dataclasses.replace(load_task("digits", train_size=128), model_factory=Toy)


def _elsewhere(default):
    """A knob value away from the default, so the search has to move to find it."""
    return default + 4 if isinstance(default, int) else default * 1.7


def test_every_declared_knob_names_a_field_of_its_config():
    for entry in list_methods():
        name = entry.config_cls.budget_field
        assert name is None or name in {f.name for f in dataclasses.fields(entry.config_cls)}, entry.name


@pytest.mark.parametrize("method", KNOBBED)
def test_the_search_finds_a_reachable_target_within_tolerance(method, toy):
    count = task_counter(toy, method, common=TOY_TARGETS)
    name, default = budget_field(method)
    value = _elsewhere(default)
    target = count({name: value})
    match = match_budget(method, target, count)
    if count({name: default}) == target:  # the knob does not size the trainable tensors (ID³'s dense update)
        assert match.field is None and match.count == target
        return
    assert match.field == name and match.matched, match
    assert abs(match.count - target) <= TOLERANCE * target
    assert count(match.params()) == match.count
    if isinstance(default, int):
        assert match.value == value  # integer counts are distinct here: the search lands on the exact rank


def test_lora_rank_is_matched_exactly_from_either_side(toy):
    count = task_counter(toy, "lora", common=TOY_TARGETS)
    for rank in (1, 5, 16):
        assert match_budget("lora", count({"rank": rank}), count).value == rank


def test_a_method_without_a_knob_is_at_its_natural_budget(toy):
    count = task_counter(toy, "bitfit", common=TOY_TARGETS)
    match = match_budget("bitfit", 10_000, count)
    assert match.field is None and match.params() == {} and not match.matched
    assert match.count == count({}) > 0


def test_refused_values_bound_the_search():
    """A fake method whose config refuses ranks below 4: the nearest accepted value is returned, unmatched."""
    def count(params):
        if params["rank"] < 4:
            raise ConfigError("rank too small")
        return 100 * params["rank"]

    match = match_budget("lora", 150, count)  # lora's knob is an int rank, default 8
    assert (match.value, match.count, match.matched) == (4, 400, False)
    assert match_budget("lora", 1210, count).value == 12


def test_the_count_leaves_out_the_head_and_counts_shared_tensors_once(toy):
    from deltatune.recipe import prepare_model

    model, _ = prepare_model(toy, "lora", {"rank": 2, **TOY_TARGETS}, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert adapter_count(model, ("classifier",)) == trainable - head > 0


def test_a_match_is_matched_only_within_tolerance():
    assert BudgetMatch("lora", "rank", 8, 1050, 1000).matched
    assert not BudgetMatch("lora", "rank", 8, 1051, 1000).matched
    assert not BudgetMatch("bitfit", None, None, 10, None).matched


def test_the_counter_plans_on_batches_of_the_training_runs_size(monkeypatch):
    """SPT plans on training batches: a count made with another batch size would match another plan."""
    import deltatune.recipe as recipe

    seen = []

    def fake_prepare(task, method, params, seed, batch_size=32):
        seen.append(batch_size)
        return nn.Linear(2, 2), None

    monkeypatch.setattr(recipe, "prepare_model", fake_prepare)
    monkeypatch.setattr("deltatune.bench.budget.adapter_count", lambda model, extra: 6)
    task = type("FakeTask", (), {"extra_trainable": ()})()
    assert task_counter(task, "spt", batch_size=16)({}) == 6
    assert task_counter(task, "spt")({}) == 6
    assert seen == [16, 32]

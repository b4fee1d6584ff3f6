"""Tasks scored by something other than accuracy: the metric travels from the task to results and tables."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.compare import MethodSummary, ranked, render_table
from deltatune.data.datasets import TensorDictDataset
from deltatune.data.task import Task
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.recipe import FinetuneResult


def _dataset(n: int = 6) -> TensorDictDataset:
    inputs = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorDictDataset({"input": inputs, "labels": torch.zeros(n).long()})


def _task(**kwargs) -> Task:
    data = _dataset()
    return Task(name="toy", description="toy", label_names=("a", "b"), train=data, validation=data, test=data,
                model_factory=lambda num_classes: nn.Linear(1, num_classes), **kwargs)


def test_a_named_metric_needs_a_scorer():
    with pytest.raises(DeltatuneError, match="metric 'fd' but has no scorer"):
        _task(metric="fd")


def test_score_uses_the_scorer_and_restores_the_mode():
    seen = []

    def scorer(model, dataset):
        model.eval()
        seen.append(len(dataset))
        return 0.25

    task = _task(metric="fd", higher_is_better=False, scorer=scorer)
    model = task.build_model().train()
    assert task.score(model, task.test) == 0.25 and seen == [6] and model.training
    assert task.better(0.1, 0.2) and not task.better(0.2, 0.1)


def test_accuracy_is_the_default_metric():
    task = _task()
    model = task.build_model()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))  # always class 0 = every label
    assert task.metric == "accuracy" and task.score(model, task.test) == 1.0 and task.better(0.9, 0.8)


def _result(metric: str) -> FinetuneResult:
    from deltatune.core.model import ParameterCount

    return FinetuneResult(task="toy", method="lora", test_score=3.0, validation_score=2.0,
                          trainable=ParameterCount(1, 10), seconds=1.0, metric=metric)


def test_accuracy_fields_refuse_another_metric():
    assert _result("accuracy").test_accuracy == 3.0
    with pytest.raises(ConfigError, match="scored by fd, not accuracy"):
        _ = _result("fd").test_accuracy
    assert "test fd 3.0000" in _result("fd").line()


def test_tables_rank_in_the_metric_direction():
    lower = [MethodSummary(m, 1, 0.1, [v], [v], [1.0], "fd", False) for m, v in (("a", 3.0), ("b", 1.0))]
    assert [s.method for s in ranked(lower)] == ["b", "a"]
    table = render_table(lower, "toy", [0])
    assert "fd (lower is better)" in table and table.index("| b |") < table.index("| a |") and "1.0000" in table
    higher = [MethodSummary(m, 1, 0.1, [v], [v], [1.0]) for m, v in (("a", 0.3), ("b", 0.9))]
    assert [s.method for s in ranked(higher)] == ["b", "a"] and "90.0" in render_table(higher, "toy", [0])

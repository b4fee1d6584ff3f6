"""Long-tailed splits: the exponential profile's counts and ratio, seeded selection, kept evaluation splits,
the many/medium/few groups and their accuracies, and the refusals."""
from __future__ import annotations

import math

import pytest
import torch

from deltatune.data.datasets import TensorDictDataset
from deltatune.data.long_tail import (
    group_accuracies,
    long_tail_counts,
    long_tail_indices,
    long_tailed,
    shot_groups,
)
from deltatune.data.task import Task
from deltatune.errors import ConfigError


def test_counts_follow_the_exponential_profile_by_hand() -> None:
    # n_c = floor(198 · 50^(−c/23)): c = 0 -> 198, c = 23 -> floor(3.96) = 3, c = 1 -> floor(198 / 50^(1/23))
    counts = long_tail_counts(198, 24, 50)
    assert counts[0] == 198 and counts[-1] == 3
    assert counts[1] == math.floor(198 / 50 ** (1 / 23)) == 167
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[0] / counts[-1] >= 50  # the floor never makes the realised ratio smaller than ρ
    assert sum(counts) == 1232  # the benchmark's split size (benchmarks/results/longtail.md)
    assert long_tail_counts(100, 3, 100) == [100, 10, 1]  # 100 · 100^(−1/2) = 10


def test_groups_use_the_literatures_thresholds() -> None:
    assert shot_groups([101, 100, 20, 19, 1]) == ["many", "medium", "medium", "few", "few"]
    groups = shot_groups(long_tail_counts(198, 24, 50))  # 198, 167, 140, 118 | 100 ... 21 | 18 ... 3
    assert (groups.count("many"), groups.count("medium"), groups.count("few")) == (4, 10, 10)


def balanced_task(per_class: int = 60, classes: int = 4) -> Task:
    labels = torch.arange(classes).repeat_interleave(per_class)
    train = TensorDictDataset({"x": torch.arange(len(labels), dtype=torch.float32)[:, None], "labels": labels})
    test = train.subset(range(0, len(labels), 3))
    return Task(name="toy", description="toy", label_names=tuple("abcd"[:classes]), train=train,
                validation=test, test=test, model_factory=lambda num_classes: torch.nn.Linear(1, num_classes))


def test_long_tailed_task_has_the_profile_and_keeps_the_evaluation_splits() -> None:
    task = balanced_task()
    before = task.train.labels.clone()
    lt = long_tailed(task, 50, seed=3)
    assert torch.bincount(lt.train.labels).tolist() == long_tail_counts(60, 4, 50) == [60, 16, 4, 1]
    assert lt.test is task.test and lt.validation is task.validation
    assert lt.name == "toy-lt50" and torch.equal(task.train.labels, before)  # the input task is left as it was
    rows = lt.train.tensors["x"].flatten().long()
    assert torch.equal(task.train.labels[rows], lt.train.labels)  # kept examples keep their own labels


def test_selection_is_seeded() -> None:
    labels = torch.arange(4).repeat_interleave(60).tolist()
    assert long_tail_indices(labels, 4, 50, seed=1) == long_tail_indices(labels, 4, 50, seed=1)
    assert long_tail_indices(labels, 4, 50, seed=1) != long_tail_indices(labels, 4, 50, seed=2)


def test_refusals() -> None:
    task = balanced_task()
    with pytest.raises(ConfigError, match="expected >= 50"):
        long_tailed(task, 10)
    with pytest.raises(ConfigError, match="n_max=40 is below imbalance_ratio=50"):
        long_tail_counts(40, 4, 50)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        long_tail_counts(100, 1, 50)
    with pytest.raises(ConfigError, match="fewer training examples"):
        long_tail_indices([0] * 60 + [1] * 5 + [2] * 5, 3, 50, n_max=60)  # asks 60, 8, 1
    with pytest.raises(ConfigError, match="equal length"):
        group_accuracies(torch.tensor([0, 1]), torch.tensor([0]), [150, 5])


def test_group_accuracies_average_per_class_accuracy() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 0, 1, 0, 2, 0, 0, 0])
    result = group_accuracies(predictions, labels, [150, 50, 5])
    assert result == {"overall": 4 / 8, "many": 1.0, "medium": 0.5, "few": 0.25}
    assert math.isnan(group_accuracies(predictions, labels, [50, 50, 50])["many"])

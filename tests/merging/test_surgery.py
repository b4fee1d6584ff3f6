"""Model Surgery: probe training against sklearn, row selection and the edit against hand computation, bad input."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deltatune.errors import ConfigError, MergeError
from deltatune.merging.editing import surgery
from deltatune.merging.editing.surgery import SurgeryConfig


def separable_data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    noise = 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    labels = (hidden @ torch.tensor([2.0, -1.0, 0.0, 0.5], dtype=torch.float64) + noise > 0).long()
    return hidden, labels


def test_train_probe_matches_sklearn_logistic_regression():
    linear_model = pytest.importorskip("sklearn.linear_model")
    hidden, labels = separable_data()
    l2 = 1e-2
    probe = surgery.train_probe(hidden, labels, l2=l2)
    reference = linear_model.LogisticRegression(C=1.0 / (len(labels) * l2), tol=1e-12, max_iter=10_000)
    reference.fit(hidden.numpy(), labels.numpy())
    assert torch.allclose(probe.weight, torch.from_numpy(reference.coef_[0]), rtol=1e-4, atol=1e-5)
    assert math.isclose(probe.bias, float(reference.intercept_[0]), rel_tol=1e-4, abs_tol=1e-5)
    assert probe.accuracy(hidden, labels) > 0.9
    assert torch.allclose(probe.unit_direction.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert probe.weight.dtype == hidden.dtype


def test_train_probe_bad_input():
    hidden, labels = separable_data(20)
    with pytest.raises(MergeError, match="both 0"):
        surgery.train_probe(hidden, torch.ones(20, dtype=torch.long))
    with pytest.raises(MergeError, match="do not match"):
        surgery.train_probe(hidden, labels[:5])
    with pytest.raises(MergeError, match="expected \\(examples, hidden size\\)"):
        surgery.train_probe(hidden[0], labels)


def test_row_cosines_hand_case():
    weight = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    cosines = surgery.row_cosines(weight, torch.tensor([2.0, 0.0]))
    assert torch.allclose(cosines, torch.tensor([1.0, 0.0, -1.0, 1 / math.sqrt(2), 0.0], dtype=torch.float64))


WEIGHTS = {"a": torch.tensor([[1.0, 0.0], [-1.0, 0.1]], dtype=torch.float64),
           "b": torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)}
DIRECTION = torch.tensor([1.0, 0.0], dtype=torch.float64)


def test_select_parameters_ranks_rows_over_all_weights():
    negative = surgery.select_parameters(WEIGHTS, DIRECTION, 2)  # paper: most negative cosine first
    assert [(name, row) for name, row, _ in negative.entries] == [("b", 0), ("a", 1)]
    assert negative.entries[0][2] == -1.0 and math.isclose(negative.entries[1][2], -1 / math.sqrt(1.01))
    positive = surgery.select_parameters(WEIGHTS, DIRECTION, 3, alignment="positive")
    assert [(name, row) for name, row, _ in positive.entries] == [("a", 0), ("b", 2), ("b", 1)]
    assert {name: rows.tolist() for name, rows in positive.rows.items()} == {"a": [0], "b": [1, 2]}
    assert len(positive) == 3


def test_select_parameters_ties_keep_mapping_then_row_order():
    weights = {"x": torch.tensor([[0.0, 1.0], [0.0, 2.0]]), "y": torch.tensor([[0.0, -1.0]])}
    selection = surgery.select_parameters(weights, torch.tensor([1.0, 0.0]), 3)  # all cosines are 0
    assert [(name, row) for name, row, _ in selection.entries] == [("x", 0), ("x", 1), ("y", 0)]


def test_select_parameters_bad_input():
    with pytest.raises(MergeError, match="k=6 rows cannot be selected: expected an integer from 1 to 5"):
        surgery.select_parameters(WEIGHTS, DIRECTION, 6)
    with pytest.raises(MergeError, match="from 1 to 5"):
        surgery.select_parameters(WEIGHTS, DIRECTION, 0)
    with pytest.raises(MergeError, match="expected \\(rows, 3\\)"):
        surgery.select_parameters(WEIGHTS, torch.ones(3), 1)
    with pytest.raises(MergeError, match="non-zero"):
        surgery.select_parameters(WEIGHTS, torch.zeros(2), 1)
    with pytest.raises(MergeError, match="no weights"):
        surgery.select_parameters({}, DIRECTION, 1)
    with pytest.raises(ConfigError, match="alignment"):
        surgery.select_parameters(WEIGHTS, DIRECTION, 1, alignment="up")


def test_apply_surgery_hand_case_and_inputs_untouched():
    originals = {name: weight.clone() for name, weight in WEIGHTS.items()}
    selection = surgery.select_parameters(WEIGHTS, DIRECTION, 2)  # rows b[0] and a[1]
    edited = surgery.apply_surgery(WEIGHTS, selection, DIRECTION, alpha=0.5)
    assert edited["a"].tolist() == [[1.0, 0.0], [-0.5, 0.1]]
    assert edited["b"].tolist() == [[-0.5, 0.0], [0.0, 1.0], [0.5, 0.5]]
    assert all(torch.equal(WEIGHTS[name], originals[name]) for name in WEIGHTS)
    away = surgery.apply_surgery(WEIGHTS, selection, DIRECTION, alpha=-1.0)  # θ - α w
    assert away["b"][0].tolist() == [-2.0, 0.0]
    untouched = surgery.select_parameters({"a": WEIGHTS["a"], "b": WEIGHTS["b"]}, DIRECTION, 1)  # only b[0]
    result = surgery.apply_surgery(WEIGHTS, untouched, DIRECTION)
    assert result["a"] is WEIGHTS["a"]


def test_apply_surgery_in_place_and_bad_input():
    weights = {name: weight.clone() for name, weight in WEIGHTS.items()}
    selection = surgery.select_parameters(weights, DIRECTION, 1)
    result = surgery.apply_surgery(weights, selection, DIRECTION, alpha=2.0, in_place=True)
    assert result["b"] is weights["b"] and weights["b"][0].tolist() == [1.0, 0.0]
    with pytest.raises(MergeError, match="not given"):
        surgery.apply_surgery({"a": WEIGHTS["a"]}, selection, DIRECTION)
    with pytest.raises(MergeError, match="does not exist"):
        surgery.apply_surgery({"b": WEIGHTS["b"][:0]}, selection, DIRECTION)


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(4, 10, bias=False)
        self.mlp.down_proj = nn.Linear(10, 4, bias=False)


def test_edit_model_edits_the_selected_gate_rows_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(TinyBlock(), TinyBlock())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    direction = torch.tensor([1.0, -1.0, 0.5, 0.0])
    config = SurgeryConfig(row_fraction=0.25, alpha=0.3)  # 0.25 x 20 candidate rows = 5
    weights = surgery.row_weights(model)
    assert sorted(weights) == ["0.mlp.gate_proj.weight", "1.mlp.gate_proj.weight"]
    expected = surgery.select_parameters({n: w.detach().clone() for n, w in weights.items()}, direction, 5)
    selection = surgery.edit_model(model, direction, config)
    assert selection.entries == expected.entries
    for name, parameter in model.named_parameters():
        change = parameter.detach() - before[name]
        rows = selection.rows.get(name, torch.zeros(0, dtype=torch.long))
        if len(rows):
            assert torch.allclose(change[rows], (0.3 * direction).expand(len(rows), -1), atol=1e-7)
        mask = torch.ones(change.shape[0], dtype=torch.bool)
        mask[rows] = False
        assert bool((change[mask] == 0).all())
    with pytest.raises(MergeError, match="no nn.Linear"):
        surgery.row_weights(model, pattern="q_proj$")


def test_config_row_count_and_validation():
    assert SurgeryConfig().row_count(32 * 11008) == 16384  # the official count on LLaMA-2-7B
    assert SurgeryConfig(rows=7).row_count(100) == 7
    assert SurgeryConfig(row_fraction=1e-6).row_count(10) == 1
    for field, value in [("row_fraction", 0.0), ("rows", 0), ("alpha", float("inf")), ("alignment", "up")]:
        with pytest.raises(ConfigError, match=field):
            SurgeryConfig(**{field: value})


class FakeEncoder(nn.Module):
    """Returns hidden_states = (embeddings, 2 x embeddings), like a transformers model with 1 layer."""

    def forward(self, input_ids, attention_mask, output_hidden_states):
        states = input_ids.unsqueeze(-1).float().repeat(1, 1, 2)
        return SimpleNamespace(hidden_states=(states, 2 * states))


def test_mean_pooled_hidden_states_ignore_padding():
    batch = {"input_ids": torch.tensor([[1, 3, 0], [4, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    pooled = surgery.mean_pooled_hidden_states(FakeEncoder(), [batch])
    assert pooled.tolist() == [[4.0, 4.0], [8.0, 8.0]]
    assert surgery.mean_pooled_hidden_states(FakeEncoder(), [batch], layer=0).tolist() == [[2.0, 2.0], [4.0, 4.0]]
    with pytest.raises(MergeError, match="no batches"):
        surgery.mean_pooled_hidden_states(FakeEncoder(), [])

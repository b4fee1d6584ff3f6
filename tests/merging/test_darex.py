"""DAREx: choosing q (grid search, output change, analytical per-layer q), importance-based pruning, AdamR."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.merging import merge_state_dicts
from deltatune.merging.algebra.importance import importance_keep_mask, importance_prune, importance_prune_state_dict
from deltatune.merging.methods.darex import DarexModelParams
from deltatune.merging.search.darex_q import (
    analytical_layer_q,
    analytical_q_map,
    analytical_row_q,
    collect_input_statistics,
    output_change,
    phi,
    search_rescale_q,
    seed_averaged,
)
from deltatune.optim.adamr import AdamR


def test_search_rescale_q_refines_around_the_best_coarse_value():
    calls = []

    def objective(q):
        calls.append(q)
        return -(q - 0.37) ** 2

    result = search_rescale_q(objective, lower=0.1, upper=0.5, step=0.1)
    assert result.best == pytest.approx(0.37, abs=1e-9)
    assert calls[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert len(result.history) == len(calls)


def test_search_rescale_q_stops_early_after_patience_misses():
    calls = []
    search_rescale_q(lambda q: calls.append(q) or -q, lower=0.01, upper=1.0, step=0.01, patience=3)
    coarse = [q for q in calls if abs(round(q / 0.01) * 0.01 - q) < 1e-9]
    assert len(calls) < 20 and coarse[:5] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    with pytest.raises(ConfigError, match="step"):
        search_rescale_q(lambda q: q, lower=0.1, step=0)


def test_output_change_and_seed_averaging():
    assert output_change(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])) == 1.5
    averaged = seed_averaged(lambda q, seed: [1.0, 1.2, 0.8, 10.0][seed] * q)
    assert averaged(2.0) == pytest.approx(2.0)  # the outlying seed 3 is dropped


def test_phi_values():
    assert phi(0.99) == pytest.approx((1 - 1.98) / math.log(0.01 / 0.99))
    assert phi(0.5) == 0.5 and phi(0.5 + 1e-9) == pytest.approx(0.5, abs=1e-6)


def _bound(c, p, q, eta, gamma=0.95):
    return abs(eta * (1 - (1 - p) / q) * c.sum() + eta**2 * phi(p) * (c**2).sum() / (4 * q**2)
               + math.log(2 / (1 - gamma)))


def test_analytical_row_q_is_the_grid_minimiser_of_the_bound():
    generator = torch.Generator().manual_seed(0)
    c = torch.randn(5, 40, generator=generator, dtype=torch.float64) * 0.5 + 0.2
    q = analytical_row_q(c, drop_rate=0.9, eta=0.7, stop_fraction=1.01)
    grid = [i * 0.001 for i in range(100, 999)]
    for row in range(5):
        values = [_bound(c[row], 0.9, g, 0.7) for g in grid]
        best = min(values)
        last_best = max(i for i, v in enumerate(values) if v <= best)  # ties go to the larger q, as in the code
        assert q[row].item() == pytest.approx(grid[last_best])


def test_analytical_layer_q_and_q_map():
    generator = torch.Generator().manual_seed(1)
    deltas = {"fc.weight": torch.randn(4, 6, generator=generator) * 0.1, "fc.bias": torch.randn(4, generator=generator),
              "norm.weight": torch.randn(6, generator=generator)}
    mean_input = torch.rand(6, generator=generator)
    q = analytical_layer_q(deltas["fc.weight"], mean_input, 0.99, 0.4, deltas["fc.bias"])
    assert 0.01 <= q < 1
    q_map = analytical_q_map(deltas, {"fc.weight": mean_input}, 0.99, 0.4)
    assert q_map["fc.weight"] == pytest.approx(q) and q_map["fc.bias"] == q_map["fc.weight"]
    assert q_map["norm.weight"] == q_map["fc.weight"]  # the mean q of the layers that have one


def test_collect_input_statistics_means_and_norms():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    batches = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 0.0, -1.0], [2.0, 1.0, 0.0]])]
    means, norms = collect_input_statistics(model, batches)
    assert means["0.weight"].tolist() == pytest.approx([2.0, 1.0, 2 / 3])
    assert norms["0.weight"].tolist() == pytest.approx([math.sqrt(14), math.sqrt(5), math.sqrt(10)])
    assert set(means) == {"0.weight", "2.weight"}
    assert not model[0]._forward_pre_hooks  # hooks removed


def test_darex_q_searched_on_output_change_beats_dare_at_extreme_pruning():
    """The paper's claim in small: at p = 0.99, the q minimising the output change beats 1/(1 − p)."""
    generator = torch.Generator().manual_seed(2)
    base = {"weight": torch.randn(64, 64, generator=generator) * 0.1}
    tuned = {"weight": base["weight"] + 0.02 + 0.01 * torch.randn(64, 64, generator=generator)}
    inputs = torch.randn(256, 64, generator=generator)
    reference = inputs @ tuned["weight"].T
    p = 0.99

    def change(q, seed=0):
        pruned = merge_state_dicts("darex", base, [tuned], None, [DarexModelParams(density=1 - p, q=q)], seed=seed)
        return output_change(reference, inputs @ pruned["weight"].T)

    result = search_rescale_q(lambda q: -change(q), lower=1 - p, upper=1.0, step=0.1)
    assert result.best > 1 - p + 0.05
    assert change(result.best) < 0.7 * change(1 - p)
    assert seed_averaged(lambda q, s: -change(q, s))(result.best) > -change(1 - p)


def test_importance_scores_and_row_groups():
    delta = torch.tensor([[0.1, -0.4, 0.2], [0.3, 0.05, -0.01]])
    norms = torch.tensor([10.0, 0.1, 1.0])  # WANDA: feature 0 matters, feature 1 barely
    wanda = importance_prune(delta, drop_rate=2 / 3, input_norm=norms)
    assert wanda.flatten().tolist() == pytest.approx([0.1, 0.0, 0.0, 0.3, 0.0, 0.0])
    magnitude = importance_prune(delta, drop_rate=0.5)
    assert magnitude.flatten().tolist() == pytest.approx([0.0, -0.4, 0.2, 0.3, 0.0, 0.0])
    assert importance_prune(delta, 0.5, rescale=0.5).abs().max().item() == pytest.approx(0.8)
    mask = importance_keep_mask(delta.abs(), 0.34, group="row")
    assert mask.sum(dim=1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="does not fit"):
        importance_prune(delta, 0.5, input_norm=torch.ones(5))


def test_importance_prune_state_dict_keeps_heads():
    base = {"encoder.weight": torch.zeros(4, 4), "classifier.weight": torch.zeros(2, 4), "ids": torch.arange(3)}
    tuned = {"encoder.weight": torch.arange(16.0).reshape(4, 4), "classifier.weight": torch.ones(2, 4),
             "ids": torch.arange(3)}
    pruned = importance_prune_state_dict(base, tuned, drop_rate=0.75)
    assert int((pruned["encoder.weight"] != 0).sum()) == 4 and pruned["encoder.weight"].max() == 15
    assert torch.equal(pruned["classifier.weight"], tuned["classifier.weight"])


def test_adamr_without_decay_is_adam():
    torch.manual_seed(0)
    first, second = nn.Linear(5, 3), nn.Linear(5, 3)
    second.load_state_dict(first.state_dict())
    adamr, adam = AdamR(first.parameters(), lr=0.01, weight_decay=0.0), torch.optim.Adam(second.parameters(), lr=0.01)
    for _ in range(5):
        x = torch.randn(8, 5)
        for model, optimizer in ((first, adamr), (second, adam)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b)


def test_adamr_pulls_toward_the_pretrained_weights():
    parameter = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = AdamR([parameter], lr=0.5, weight_decay=0.1)
    with torch.no_grad():
        parameter.copy_(torch.tensor([3.0, -2.0]))  # drift after construction: θ − θ0 = [2, 0]
    parameter.grad = torch.zeros_like(parameter)  # v̂ = 0 → the decay uses sqrt(mean v̂) = 1
    optimizer.step()
    assert parameter.tolist() == pytest.approx([3.0 - 0.5 * 0.1 * 2.0, -2.0])
    l1 = AdamR([parameter], lr=0.5, weight_decay=0.1, l1=True, reference={parameter: torch.zeros(2)})
    parameter.grad = torch.zeros_like(parameter)
    before = parameter.detach().clone()
    l1.step()
    assert (before - parameter).tolist() == pytest.approx([0.05, -0.05])


def test_adamr_matches_the_official_update_rule():
    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(3, dtype=torch.float64)), nn.Parameter(torch.randn(2, dtype=torch.float64))]
    start = [p.detach().clone() for p in params]
    optimizer = AdamR(params, lr=0.1, weight_decay=0.5)
    theta, m, v = [p.detach().clone() for p in params], [torch.zeros_like(p) for p in params], \
        [torch.zeros_like(p) for p in params]
    for step in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
        v_hat = [x / (1 - 0.999**step) for x in v]
        root = math.sqrt(sum(float(x.sum()) for x in v_hat) / 5)
        for i in range(2):
            theta[i] = theta[i] - 0.5 * 0.1 / root * (theta[i] - start[i])
            theta[i] = theta[i] - 0.1 / (1 - 0.9**step) * m[i] / (v_hat[i].sqrt() + 1e-8)
    for p, expected in zip(params, theta):
        torch.testing.assert_close(p.detach(), expected)


def test_adamr_factory_for_trainers():
    model = nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    optimizer = AdamR.factory(weight_decay=1e-3)(model, lr=0.05)
    assert isinstance(optimizer, AdamR) and optimizer.param_groups[0]["lr"] == 0.05
    assert len(optimizer.param_groups[0]["params"]) == 1
    with pytest.raises(ConfigError, match="weight_decay"):
        AdamR(model.parameters(), weight_decay=-1)


@pytest.mark.parametrize("q", [0.5, 0.8, None])
def test_darex_without_dropping_still_divides_by_q(q):
    """δ̂ = m ⊙ δ / q with m = 1 at density 1 (the official rescale_v divides whatever was dropped)."""
    generator = torch.Generator().manual_seed(4)
    base = {"weight": torch.randn(6, 5, generator=generator, dtype=torch.float64)}
    tuned = {"weight": base["weight"] + torch.randn(6, 5, generator=generator, dtype=torch.float64)}
    merged = merge_state_dicts("darex", base, [tuned], None, [DarexModelParams(density=1.0, q=q)], seed=0)
    delta = tuned["weight"] - base["weight"]
    expected = base["weight"] + (delta / q if q is not None else delta)
    torch.testing.assert_close(merged["weight"], expected, rtol=0, atol=1e-15)


def test_prune_with_q_leaves_the_kept_head_whole_and_divides_the_rest(tmp_path):
    from deltatune.cli import main
    from merging.tiny_checkpoints import load_folder, make_models

    base_dir, dirs, base, tuned = make_models(tmp_path, count=1)
    out = tmp_path / "pruned"
    assert main(["prune", str(dirs[0]), "--base", str(base_dir), "--out", str(out), "--method", "darex",
                 "--drop-rate", "0.0", "--q", "0.5", "--keep", "embed_tokens", "--no-progress"]) == 0
    pruned = load_folder(out)
    head, body = "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(pruned[head], tuned[0][head])
    torch.testing.assert_close(pruned[body] - base[body], (tuned[0][body] - base[body]) / 0.5)

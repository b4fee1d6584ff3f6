"""Magnitude pruning (deltatune.train.pruning): exact densities, the largest |w| kept, masks kept in retraining."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError, TrainingError
from deltatune.merging.algebra.ops import keep_count
from deltatune.optim import SAM
from deltatune.train.pruning import PrunedWeights, expected_kept, magnitude_masks


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 3))


@pytest.mark.parametrize("density", [0.5, 0.2, 0.05, 0.013, 1.0])
def test_uniform_keeps_exactly_the_density_of_each_layer_and_its_largest_weights(density: float) -> None:
    model = _net()
    masks = magnitude_masks(model, density)
    assert set(masks) == {"0", "2"}  # the code's default: conv weights only
    for name, mask in masks.items():
        weight = dict(model.named_modules())[name].weight.detach().abs()
        assert int(mask.sum()) == keep_count(weight.numel(), density)  # ⌊density·n⌋, at least one
        if not mask.all():
            assert weight[mask].min() >= weight[~mask].max()
    assert sum(int(m.sum()) for m in masks.values()) == expected_kept(model, density)


def test_global_uses_one_cut_off_over_all_layers_and_an_exact_total() -> None:
    model = _net()
    with torch.no_grad():
        model[0].weight.mul_(10.0)  # layer 0 dominates: global pruning keeps more of it than uniform would
    masks = magnitude_masks(model, 0.2, scope="global")
    weights = {name: dict(model.named_modules())[name].weight.detach().abs() for name in masks}
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(total, 0.2) == expected_kept(model, 0.2,
                                                                                                 scope="global")
    kept_min = min(float(weights[n][m].min()) for n, m in masks.items() if m.any())
    pruned_max = max(float(weights[n][~m].max()) for n, m in masks.items() if (~m).any())
    assert kept_min >= pruned_max
    assert masks["0"].float().mean() > 0.2 > masks["2"].float().mean()


def test_linear_layers_join_when_asked_and_the_model_is_not_modified() -> None:
    model = _net()
    before = copy.deepcopy(model.state_dict())
    masks = magnitude_masks(model, 0.1, layer_types=(nn.Conv2d, nn.Linear))
    assert set(masks) == {"0", "2", "6"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="density"):
        magnitude_masks(_net(), 0.0)
    with pytest.raises(ConfigError, match="scope"):
        magnitude_masks(_net(), 0.5, scope="unif")
    with pytest.raises(ConfigError, match="no Conv2d"):
        magnitude_masks(nn.Linear(3, 3), 0.5)
    with pytest.raises(ConfigError, match="torch.bool"):
        PrunedWeights(_net(), {"0": torch.ones(4, 1, 3, 3)})
    with pytest.raises(ConfigError, match="not a module"):
        PrunedWeights(_net(), {"nowhere": torch.ones(1, dtype=torch.bool)})


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5, sam: bool = False) -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        closure()
        optimizer.step(closure) if sam else optimizer.step()


@pytest.mark.parametrize("rule", ["sgd", "adamw", "sam"])
def test_masks_are_kept_through_retraining(rule: str) -> None:
    model = _net()
    masks = magnitude_masks(model, 0.2)
    pruned = PrunedWeights(model, masks).attach()
    start = {name: dict(model.named_modules())[name].weight.detach().clone() for name in masks}
    if rule == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        if rule == "sam":
            optimizer = SAM(optimizer, rho=0.5, model=model)
    _steps(model, optimizer, sam=rule == "sam")
    pruned.check()
    for name, mask in masks.items():
        weight = dict(model.named_modules())[name].weight.detach()
        assert torch.all(weight[~mask] == 0)  # exactly zero, not small
        assert not torch.equal(weight[mask], start[name][mask])  # the kept weights did train
    assert pruned.density() == pytest.approx(expected_kept(model, 0.2) / sum(m.numel() for m in masks.values()))


def test_a_loop_that_bypasses_the_masks_is_refused_and_apply_restores_them() -> None:
    model = _net()
    pruned = PrunedWeights(model, magnitude_masks(model, 0.2)).attach()
    pruned.detach()  # no gradient masking any more
    _steps(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TrainingError, match="no longer zero"):
        pruned.check()
    pruned.apply()
    pruned.check()

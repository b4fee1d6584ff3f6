"""The SaRA, ID³ and SNELLA schedules bind their deltas by adapter name, as the allocators do: a config equal to
the adapted one (but another object) drives the same deltas, a name that finds none is refused."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.functional.sparse import scatter_matrix
from deltatune.methods.id3 import ID3Config, ID3Delta, ID3Unmasking
from deltatune.methods.sara import SaRAConfig, SaRADelta, SaRASchedule
from deltatune.methods.snella import SNELLAAllocation, SNELLAConfig, SNELLADelta

# (config, its delta class, the schedule class, how the schedule lists the deltas it drives)
SCHEDULES = {
    "sara": (SaRAConfig(fraction=0.3, nuclear_weight=0.01, seed=3), SaRADelta, SaRASchedule,
             lambda schedule: schedule.deltas),
    "id3": (ID3Config(budget=40), ID3Delta, ID3Unmasking, lambda schedule: [d for _, d in schedule.pairs]),
    "snella": (SNELLAConfig(rank=2, allocation_interval=1), SNELLADelta, SNELLAAllocation,
               lambda schedule: schedule.deltas),
}


def _square_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(80, 72), nn.Tanh(), nn.Linear(72, 70)).double()


def _deltas(model, adapter: str = "default") -> list:
    return [delta for _, _, delta in dt.iter_deltas(model, adapter)]


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_an_equal_but_distinct_config_drives_the_adapted_deltas(method):
    config, _, _, bound = SCHEDULES[method]
    model = dt.adapt(_square_model(), config)
    equal = copy.deepcopy(config)
    assert equal == config and equal is not config
    (schedule,) = equal.training_callbacks(model, 10)
    assert [id(d) for d in bound(schedule)] == [id(d) for d in _deltas(model)] and len(_deltas(model)) == 2


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_a_wrong_adapter_name_is_refused_naming_the_adapters_present(method):
    config, delta_type, schedule_type, _ = SCHEDULES[method]
    model = dt.adapt(_square_model(), config)
    expected = (f"adapter 'other' has no {delta_type.__name__} on this model \\(adapters: default "
                f"\\({type(config).__name__}\\)\\); pass adapter=")
    with pytest.raises(ConfigError, match=expected):
        schedule_type(model, config, 10, adapter="other")


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_an_adapter_of_another_method_is_refused(method):
    config, delta_type, schedule_type, _ = SCHEDULES[method]
    model = dt.adapt(_square_model(), dt.LoRAConfig(rank=2), name="lora")
    with pytest.raises(ConfigError, match=f"adapter 'lora' has no {delta_type.__name__}.*lora \\(LoRAConfig\\)"):
        schedule_type(model, config, 10, adapter="lora")


# A setting per method that makes a config unequal to the adapted one.
OTHER_SETTING = {"sara": {"seed": 99}, "id3": {"budget": 41}, "snella": {"rank": 4}}


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_a_config_that_was_never_adapted_is_refused(method):
    config, _, _, _ = SCHEDULES[method]
    model = dt.adapt(_square_model(), config)
    other = dataclasses.replace(config, **OTHER_SETTING[method])
    with pytest.raises(ConfigError, match=f"this {type(config).__name__} is not attached to the model "
                                          f"\\(adapters: default \\({type(config).__name__}\\)\\)"):
        other.training_callbacks(model, 10)


@pytest.mark.parametrize("method", sorted(SCHEDULES))
def test_a_named_adapter_binds_only_its_own_deltas(method):
    config, _, schedule_type, bound = SCHEDULES[method]
    model = dt.adapt(_square_model(), config, name="first")
    dt.adapt(model, copy.deepcopy(config), name="second")
    schedule = schedule_type(model, config, 10, adapter="second")
    assert [id(d) for d in bound(schedule)] == [id(d) for d in _deltas(model, "second")]


def _nuclear(delta: SaRADelta) -> torch.Tensor:
    matrix = scatter_matrix(delta.base_values + delta.values.detach(), delta.indices, delta.matrix_shape)
    return delta.config.nuclear_weight * torch.linalg.svdvals(matrix).sum()


def test_sara_pays_the_nuclear_norm_of_one_of_its_own_matrices_per_step():
    """With an equal config: one matrix per step is penalized, not all of them (issue 10: 36 SVDs a step)."""
    config = SaRAConfig(fraction=0.3, nuclear_weight=0.01, seed=3, progressive_at=None)
    model = dt.adapt(_square_model(), config)
    other = dt.adapt(_square_model(1), SaRAConfig(fraction=0.3, nuclear_weight=0.01, seed=3), name="other")
    deltas = _deltas(model)
    with torch.no_grad():
        for number, delta in enumerate(deltas):
            delta.values.copy_(torch.randn(delta.values.shape, generator=torch.Generator().manual_seed(number),
                                           dtype=torch.float64))
    (schedule,) = copy.deepcopy(config).training_callbacks(model, total_steps=10)
    chosen = set()
    for step in range(8):
        schedule.on_step_begin(global_step=step)
        penalized = [d for d in deltas if d.penalized]
        assert len(penalized) == 1
        chosen.add(id(penalized[0]))
        torch.testing.assert_close(dt.regularization_loss(model), _nuclear(penalized[0]), rtol=1e-10, atol=1e-12)
    assert chosen == {id(d) for d in deltas}  # the random choice covers both matrices
    assert all(d.penalized for d in _deltas(other, "other")), "another model's SaRA deltas were touched"


def test_sara_progressive_reselection_runs_in_the_trainer_with_an_equal_config():
    """Trained at a high learning rate, entries leave the selection range: at half of training they freeze."""
    from deltatune.train import TrainConfig, Trainer

    config = SaRAConfig(fraction=0.3, nuclear_weight=0.0)
    model = dt.adapt(_square_model(), config)
    deltas = _deltas(model)
    selected = [int(d.active.sum()) for d in deltas]
    callbacks = copy.deepcopy(config).training_callbacks(model, total_steps=8)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 80, generator=generator, dtype=torch.float64),
                         torch.randint(70, (64,), generator=generator))
    seen = []

    class ActiveAt:
        def on_step_end(self, global_step, **_):
            seen.append((global_step, [int(d.active.sum()) for d in deltas]))

    Trainer(model, TrainConfig(max_steps=8, batch_size=8, lr=0.05, progress=False), data,
            callbacks=[*callbacks, ActiveAt()]).train()
    assert callbacks[0].adjusted
    before = [active for step, active in seen if step <= 4]  # the adjustment runs at the start of step 5
    after = [active for step, active in seen if step > 4]
    assert all(active == selected for active in before)
    assert all(a < s for a, s in zip(after[0], selected)), (after[0], selected)
    assert all(active == after[0] for active in after)

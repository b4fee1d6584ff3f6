from __future__ import annotations

import math

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.train import TrainConfig, build_scheduler, lr_multiplier


@pytest.mark.parametrize("field,value,words", [
    ("epochs", 0, "epochs=0"),
    ("max_steps", 0, "max_steps=0"),
    ("batch_size", 0, "batch_size=0"),
    ("grad_accum_steps", 64, "from 1 to batch_size=32"),
    ("lr", 0.0, "lr=0.0"),
    ("lr", -1e-3, "> 0"),
    ("weight_decay", -0.1, "weight_decay=-0.1"),
    ("warmup_ratio", 1.0, "[0, 1)"),
    ("warmup_steps", -1, "warmup_steps=-1"),
    ("schedule", "step", "one of ('linear', 'cosine', 'constant')"),
    ("max_grad_norm", 0.0, "None (no clipping)"),
    ("log_every", 0, "log_every=0"),
    ("checkpoint_every", 0, "checkpoint_every=0"),
    ("keep_last", 0, "keep_last=0"),
    ("num_workers", -1, "num_workers=-1"),
    ("seed", -3, "seed=-3"),
    ("epochs", True, "epochs=True"),
])
def test_bad_values_name_the_field_value_and_range(field, value, words):
    with pytest.raises(ConfigError, match=None) as info:
        TrainConfig(**{field: value})
    message = str(info.value)
    assert words in message and "\n" not in message


def test_warmup_steps_and_ratio_are_exclusive():
    with pytest.raises(ConfigError, match="either warmup_steps or warmup_ratio"):
        TrainConfig(warmup_steps=3, warmup_ratio=0.1)


@pytest.mark.parametrize("kwargs", [{"resume": True}, {"checkpoint_every": 5}])
def test_resume_and_checkpoints_need_an_output_dir(kwargs):
    with pytest.raises(ConfigError, match="output_dir=None"):
        TrainConfig(**kwargs)


def test_warmup_ratio_rounds_up_but_not_on_floating_point_noise():
    assert TrainConfig(warmup_ratio=0.1).warmup_for(30) == 3  # 0.1 * 30 = 3.0000000000000004
    assert TrainConfig(warmup_ratio=0.1).warmup_for(25) == 3  # 2.5 -> 3
    assert TrainConfig(warmup_steps=7).warmup_for(100) == 7


def test_linear_schedule_with_warmup_hand_computed():
    f = lr_multiplier("linear", total_steps=10, warmup_steps=2)
    # warm-up 0/2, 1/2; then (10 - s) / 8
    expected = [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0]
    assert [f(s) for s in range(12)] == pytest.approx(expected, abs=1e-15)


def test_cosine_schedule_with_warmup_hand_computed():
    f = lr_multiplier("cosine", total_steps=6, warmup_steps=2)
    # after warm-up: 0.5 * (1 + cos(pi * (s - 2) / 4)) for s = 2..6
    expected = [0.0, 0.5, 1.0, 0.5 * (1 + math.sqrt(0.5)), 0.5, 0.5 * (1 - math.sqrt(0.5)), 0.0]
    assert [f(s) for s in range(7)] == pytest.approx(expected, abs=1e-15)


def test_constant_and_no_warmup():
    constant = lr_multiplier("constant", total_steps=5, warmup_steps=4)
    assert [constant(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_multiplier("linear", total_steps=4, warmup_steps=0)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_scheduler_drives_the_optimizer_lr_and_its_state_has_no_code():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.4)
    scheduler = build_scheduler(optimizer, "linear", total_steps=4, warmup_steps=2)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.2])
    assert scheduler.state_dict()["lr_lambdas"] == [None]

"""`deltatune.train.sharding` in this process, on a model sharded by FSDP2 over a one-process gloo group (its
parameters are DTensors as under torchrun): the helpers' contracts, fast and without a launch."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import deltatune as dt
from deltatune.errors import TrainingError
from deltatune.train.distributed import World, shard_model
from deltatune.train.sharding import (
    differentiable_parameters,
    full_parameters,
    is_sharded,
    is_sharded_tensor,
    save_full_adapter,
    sharded_like,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def one_process_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _sharded_lora(one_process_group) -> nn.Module:
    torch.manual_seed(0)
    model = dt.adapt(Blocks().to(F64), dt.LoRAConfig(rank=2, targets=["blocks.0.0", "blocks.1.0"]))
    return shard_model(model)


def _lora_b(model: nn.Module) -> nn.Parameter:
    return model.blocks[0][0].deltas["default"].lora_B


def test_full_parameters_gives_plain_full_tensors_and_writes_changes_back(one_process_group):
    model = _sharded_lora(one_process_group)
    assert is_sharded(model) and is_sharded_tensor(_lora_b(model))
    model(torch.randn(3, 6, dtype=F64)).sum().backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    with full_parameters(model, optimizer):
        inside = _lora_b(model)
        assert type(inside) is nn.Parameter and inside.shape == (6, 2) and type(inside.grad) is torch.Tensor
        assert type(optimizer.state[inside]["exp_avg"]) is torch.Tensor
        assert any(p is inside for group in optimizer.param_groups for p in group["params"])
        inside.data.fill_(0.25)
    outside = _lora_b(model)
    assert is_sharded_tensor(outside) and is_sharded_tensor(optimizer.state[outside]["exp_avg"])
    assert torch.equal(outside.full_tensor(), torch.full((6, 2), 0.25, dtype=F64))
    with full_parameters(model, optimizer):
        assert _lora_b(model) is inside  # the same stand-in each time: identities kept by callbacks hold
    assert inside.numel() == 0  # its gathered copy is released outside


def test_the_frozen_base_is_gathered_only_when_asked(one_process_group):
    model = _sharded_lora(one_process_group)
    with full_parameters(model):
        assert is_sharded_tensor(model.blocks[0][0].base_layer.weight)
    with full_parameters(model, frozen=True):
        assert type(model.blocks[0][0].base_layer.weight) is nn.Parameter


def test_replacing_a_sharded_parameter_is_refused_and_the_model_is_left_whole(one_process_group):
    model = _sharded_lora(one_process_group)
    delta = model.blocks[0][0].deltas["default"]
    with pytest.raises(TrainingError, match="replaced or reshaped the sharded parameter 'lora_B'"):
        with full_parameters(model):
            delta.lora_B = nn.Parameter(torch.zeros(6, 3, dtype=F64))
    assert all(is_sharded_tensor(p) for p in model.parameters())


def test_a_regularizer_on_gathered_tensors_back_propagates_into_the_shards(one_process_group):
    model = _sharded_lora(one_process_group)
    with differentiable_parameters(model):
        (_lora_b(model) ** 2).sum().backward()  # d/dB sum(B^2) = 2B, by hand
    b = _lora_b(model)
    assert is_sharded_tensor(b.grad)
    torch.testing.assert_close(b.grad.full_tensor(), 2 * b.full_tensor(), atol=0, rtol=0)


def test_full_checkpoint_tensors_load_into_the_sharded_model(one_process_group):
    model = _sharded_lora(one_process_group)
    full = {"blocks.0.0.deltas.default.lora_B": torch.arange(12, dtype=F64).reshape(6, 2)}
    model.load_state_dict(sharded_like(model, full), strict=False)
    assert torch.equal(_lora_b(model).full_tensor(), full["blocks.0.0.deltas.default.lora_B"])


def test_the_saved_adapter_holds_full_tensors(one_process_group, tmp_path):
    model = _sharded_lora(one_process_group)
    with torch.no_grad():
        _lora_b(model).to_local().fill_(0.5)
    save_full_adapter(model, tmp_path / "adapter", World(0, 0, 1, torch.device("cpu")))
    torch.manual_seed(0)
    fresh = Blocks().to(F64)
    dt.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh.blocks[0][0].deltas["default"].lora_B, torch.full((6, 2), 0.5, dtype=F64))

"""Full tensors of a sharded (FSDP2) model for the code that reads or writes whole parameters.

FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps each parameter as a DTensor: every process holds one slice
of it, of its gradient and of its optimizer state. Code that decides from whole tensors (an allocator's
importance |θ ⊙ ∇θ|, SaRA's progressive re-selection, ID³'s unmasking, a checkpoint) cannot run on slices, and
one process's slice would give another decision than its neighbour's. This module is the one place where that is
handled, for every schedule and file writer at once:

    with full_parameters(model, optimizer):   # collective: every process enters it
        callback.on_step_end(...)             # sees plain full tensors: data, .grad and optimizer state

Inside, each sharded parameter of `model` is replaced on its module by a plain `nn.Parameter` holding the
gathered tensor (the same object every time, so identities kept across hooks still match), its gradient and its
optimizer state are gathered too, and the optimizer refers to it. On leaving, every process writes its own slice
of the (possibly changed) full tensors back into the sharded ones. All processes gather the same bytes and run
the same deterministic code, so they take the same decisions and write back a consistent tensor.

A regularizer (SaRA's nuclear norm, AdaLoRA's orthogonality) must be differentiable: `differentiable_parameters`
gives it gathered tensors whose gradient flows back into each process's own slice.

Nothing here runs when the model is not sharded: both contexts are then no-ops.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import TrainingError
from deltatune.train.distributed import World, main_writes

try:  # torch >= 2.5; older builds have no FSDP2, so nothing can be sharded there
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

# One plain stand-in per sharded parameter, kept on it (so it lives as long as the sharded one): its storage is
# released between uses, so it costs nothing outside `full_parameters`, and a callback that kept it (by id)
# finds it again.
STAND_IN_ATTRIBUTE = "_deltatune_full_stand_in"


def is_sharded_tensor(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Does `model` hold a sharded (DTensor) parameter?"""
    return any(is_sharded_tensor(p) for p in model.parameters())


@dataclass
class _Swap:
    module: nn.Module
    name: str
    sharded: nn.Parameter
    full: nn.Parameter


def _sharded_slots(model: nn.Module, frozen: bool = True) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, attribute, parameter) for every sharded parameter of `model`; with `frozen=False` only those that
    train or belong to a delta (the frozen base stays sharded: gathering it puts the whole model on every
    process, and only a schedule that scores the base weights, ID³'s, needs it)."""
    from deltatune.core.delta import Delta

    _reshard(model)
    in_deltas = {id(p) for module in model.modules() if isinstance(module, Delta) for p in module.parameters()}
    return [(module, name, parameter) for module in model.modules()
            for name, parameter in module._parameters.items()
            if is_sharded_tensor(parameter) and (frozen or parameter.requires_grad or id(parameter) in in_deltas)]


def _reshard(model: nn.Module) -> None:
    """Put every FSDP unit back to its sharded parameters: the root unit keeps its gathered ones after a forward
    (FSDP2 does not reshard the root after forward), and those are views FSDP frees later."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _stand_in(sharded: nn.Parameter) -> nn.Parameter:
    full = getattr(sharded, STAND_IN_ATTRIBUTE, None)
    if full is None:
        full = nn.Parameter(torch.empty(0, dtype=sharded.dtype, device=sharded.device),
                            requires_grad=sharded.requires_grad)
        setattr(sharded, STAND_IN_ATTRIBUTE, full)
    return full


@contextlib.contextmanager
def full_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    frozen: bool = False) -> Iterator[None]:
    """Inside: every sharded parameter of `model` that trains or belongs to a delta (every one with `frozen=True`)
    is a plain full `nn.Parameter` (with its full `.grad`, and its full state in `optimizer`); on leaving, each
    process's slice of them is written back. A collective: every process must enter it at the same point. A
    no-op for a model without sharded parameters."""
    slots = _sharded_slots(model, frozen)
    if not slots:
        yield
        return
    swaps = [_gather(module, name, sharded) for module, name, sharded in slots]
    by_full = {id(swap.full): swap for swap in swaps}
    if optimizer is not None:
        _swap_optimizer(optimizer, {id(swap.sharded): swap.full for swap in swaps}, gather=True)
    try:
        yield
    finally:
        if optimizer is not None:
            _swap_optimizer(optimizer, {key: swap.sharded for key, swap in by_full.items()}, gather=False)
        _scatter_all(swaps)


def _scatter_all(swaps: list[_Swap]) -> None:
    """Put every sharded parameter back, even after a refused one, then raise the first refusal."""
    refusals = []
    for swap in swaps:
        try:
            _scatter(swap)
        except TrainingError as error:
            refusals.append(error)
    if refusals:
        raise refusals[0]


def _gather(module: nn.Module, name: str, sharded: nn.Parameter) -> _Swap:
    full = _stand_in(sharded)
    full.data = sharded.detach().full_tensor()
    full.requires_grad_(sharded.requires_grad)
    full.grad = None if sharded.grad is None else sharded.grad.full_tensor()
    module._parameters[name] = full
    return _Swap(module, name, sharded, full)


def _scatter(swap: _Swap) -> None:
    """Write this process's slice of the stand-in back into the sharded parameter and put that one back."""
    now = swap.module._parameters.get(swap.name)
    swap.module._parameters[swap.name] = swap.sharded
    full = swap.full
    try:
        if now is not full or full.shape != swap.sharded.shape:
            raise TrainingError(
                f"a callback replaced or reshaped the sharded parameter {swap.name!r} of "
                f"{type(swap.module).__name__} (shape {tuple(swap.sharded.shape)}); under FSDP a schedule may "
                "change a parameter's values but not the parameter itself: train with TrainConfig(sharding='ddp')")
        with torch.no_grad():
            swap.sharded.to_local().copy_(_local_slice(full.detach(), swap.sharded))
        swap.sharded.grad = None if full.grad is None else _as_sharded(full.grad, swap.sharded)
        swap.sharded.requires_grad_(full.requires_grad)
    finally:
        full.grad = None
        full.data = torch.empty(0, dtype=full.dtype, device=full.device)  # release the gathered copy


def _local_slice(full: Tensor, like: Tensor) -> Tensor:
    """This process's slice of `full` laid out as the DTensor `like` (no communication: every process holds
    the same full tensor)."""
    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None).to_local()


def _as_sharded(full: Tensor, like: Tensor) -> Tensor:
    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None)


def _swap_optimizer(optimizer: torch.optim.Optimizer, replacement: dict[int, nn.Parameter], gather: bool) -> None:
    """Point `optimizer`'s groups and state at the replacement parameters, gathering (or re-sharding) the state
    tensors laid out like their parameter."""
    for group in optimizer.param_groups:
        group["params"] = [replacement.get(id(p), p) for p in group["params"]]
    old_keys = [key for key in list(optimizer.state) if id(key) in replacement]
    for key in old_keys:
        new_key = replacement[id(key)]
        state = optimizer.state.pop(key)
        optimizer.state[new_key] = {name: _convert_state(value, key if gather else new_key, gather)
                                    for name, value in state.items()}


def _convert_state(value: Any, sharded: Tensor, gather: bool) -> Any:
    if gather:
        return value.full_tensor() if is_sharded_tensor(value) else value
    laid_out_like_parameter = (isinstance(value, Tensor) and not is_sharded_tensor(value) and value.dim() > 0
                               and value.shape == sharded.shape)
    return _as_sharded(value, sharded) if laid_out_like_parameter else value


@contextlib.contextmanager
def differentiable_parameters(model: nn.Module) -> Iterator[None]:
    """Inside: every sharded parameter of `model` reads as its gathered full tensor, differentiable, so a loss
    term computed from parameters outside forward (a regularizer) back-propagates into each process's slice.
    Every process computes the same term on the same tensors, so each slice gets the whole term's gradient
    (not an average). A collective; a no-op without sharded parameters."""
    slots = _sharded_slots(model, frozen=False)
    for module, name, sharded in slots:
        module._parameters[name] = sharded.full_tensor()  # a view the module reads as its attribute
    try:
        yield
    finally:
        for module, name, sharded in slots:
            module._parameters[name] = sharded


def sharded_like(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`tensors` (full, by state-dict key) with each one whose parameter in `model` is sharded cut to this
    process's slice as a DTensor, for `model.load_state_dict` (FSDP2's own loading then keeps its layout).
    No communication: every process holds the same full tensors."""
    _reshard(model)
    parameters = dict(model.named_parameters())
    return {key: _as_sharded(value, parameters[key]) if is_sharded_tensor(parameters.get(key)) else value
            for key, value in tensors.items()}


def full_norm(norm: Tensor) -> Tensor:
    """A gradient norm `clip_grad_norm_` computed over sharded gradients, as a plain tensor."""
    return norm.full_tensor() if is_sharded_tensor(norm) else norm


def save_full_adapter(model: nn.Module, path: str | os.PathLike, world: World, name: str = "default",
                      format: str = "deltatune") -> Path:
    """`deltatune.save_adapter` for a model that may be sharded: every process gathers the adapter's full
    tensors (a collective: call it on every process), rank 0 writes the files (each temp-then-rename, as
    `save_adapter` does), so the adapter is complete and loads in one process. Every process gets the path, or
    the error rank 0 met."""
    from deltatune.core.state import save_adapter

    with full_parameters(model):
        return main_writes(world, lambda: save_adapter(model, path, name, format), "save the adapter")

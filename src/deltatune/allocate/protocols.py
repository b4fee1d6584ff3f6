"""Capabilities that allocators rely on. Allocators find deltas with `deltatune.iter_deltas` and test these
runtime-checkable protocols; they never check a method's class.

A delta "has rank components" when its update is a sum of rank-one pieces living in a fixed number of slots
(`rank_capacity`), of which `rank_mask` marks the live ones. Tensor shapes never change: pruning and growing
only flip mask entries and (re)initialize slot values, so optimizers and adapter files stay valid; the slots a
change (re)initializes are reported (`HasNewSlots`) and get a new parameter's optimizer state
(`fresh_state`), as the official codes' new parameters do.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from deltatune.core.capabilities import HasRank


@runtime_checkable
class HasRankComponents(HasRank, Protocol):
    """Read side: which components are live (`rank`, from `core.capabilities.HasRank`, counts them), and the
    tensors that hold them."""

    rank_mask: Tensor  # (capacity,) bool, a persistent buffer: saved with the adapter

    @property
    def rank_capacity(self) -> int: ...

    def component_tensors(self) -> dict[str, tuple[Tensor, int]]:
        """Trainable tensors holding the components: name -> (parameter, the dimension indexing slots)."""
        ...

    def delta_matrix(self) -> Tensor:
        """ΔW as an (out, fan_in) matrix (the `core.layers` matrix view), differentiable."""
        ...

    def live_parameter_count(self) -> int:
        """Trainable numbers that the live components use (the budget they spend)."""
        ...


@runtime_checkable
class CanPruneRank(Protocol):
    """AdaLoRA-style: drop components by zeroing their values (they may come back while still trainable)."""

    def prune_components(self, keep: Tensor) -> None: ...


@runtime_checkable
class CanGrowRank(Protocol):
    """IncreLoRA/TriAdaptLoRA-style: turn free slots into live components, initialized the method's way."""

    def grow_rank(self, count: int, step: int) -> int:
        """Make up to `count` more components live; return how many were added (limited by capacity)."""
        ...

    def stop_growth(self) -> None:
        """Called once the global target is reached (IncreLoRA switches its reserves off)."""
        ...


@runtime_checkable
class CanResizeRank(Protocol):
    """CoLoRA-style: set a module's live rank directly (drop the weakest components, add fresh ones)."""

    def resize_rank(self, rank: int, step: int) -> None: ...


@runtime_checkable
class HasNewSlots(Protocol):
    """Reports the slots whose values a grow or resize (re)initialized: they start over, like new parameters."""

    def take_new_slots(self) -> dict[str, Tensor]:
        """Component tensor name (as in `component_tensors`) -> indices of the slots (re)initialized since the
        last call (int64, along that tensor's slot dimension); the record is then cleared."""
        ...


@runtime_checkable
class HasTriangularCore(Protocol):
    """TriAdaptLoRA-style: a core matrix assembled from triangular blocks, one block per growth event."""

    def core_matrix(self) -> Tensor:
        """The live R×R core C = L + U (detached use only)."""
        ...

    @property
    def block_count(self) -> int: ...


@runtime_checkable
class HasActivationObserver(Protocol):
    """The delta reports (its input after dropout, its output) to an observer during forward, which lets an
    allocator form ∂L/∂ΔW without materializing ΔW in the forward pass (IncreLoRA's module score)."""

    def set_activation_observer(self, observer: Any) -> None: ...


@runtime_checkable
class CanWarmUpComponents(Protocol):
    """Components whose learning rate restarts from zero when they appear (IncreLoRA's restart warmup):
    per component tensor, the factor in [0, 1] applied to each slot's update of the step just taken."""

    def update_factors(self, step: int, warmup_steps: int) -> dict[str, Tensor]: ...

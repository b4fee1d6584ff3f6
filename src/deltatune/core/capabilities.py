"""Optional capabilities of deltas and configs, declared in one place as runtime-checkable protocols.

Core, merging and the allocators find an optional feature with ``isinstance(obj, Capability)``, never by a
string ``hasattr``: a method opts in by defining the members below with these signatures, and
tests/core/test_capabilities.py checks, for every registered method, that a delta (or config) that has one
member of a capability has all of them, with the declared signatures (no half-declared capability).

The rank-allocation capabilities (rank components, pruning, growth, new slots, ...) stay beside the allocators
that use them, in `deltatune.allocate.protocols`; the same test walks them too.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn


# --- the forward path ----------------------------------------------------------------------------------------
@runtime_checkable
class FusesWithBase(Protocol):
    """An additive delta that can compute the base output and its own term together (one fused autograd
    node, `functional.lowrank.lowrank_linear`); `core.host.AdaptedLayer` uses it for the first additive delta
    when no weight-space delta runs before it. A weight-space delta with it (DoRA) computes the layer's output
    with its adapted weight on the activation path; the host uses it when that delta is the only weight-space one."""

    def forward_with_base(self, x: Tensor, base_layer: nn.Module) -> Tensor | None:
        """base_layer(x) + forward(x), or None when this call cannot be fused (the host then runs both)."""
        ...


@runtime_checkable
class KeepsBaseInEval(Protocol):
    """A delta whose paper trains with the frozen model in eval mode (VPT: no dropout, fixed statistics in the
    backbone; only the prompts and the head train). `deltatune.set_training_mode` reads it."""

    def keeps_base_in_eval(self) -> bool:
        """True when the frozen modules around this (active) delta must stay in eval mode during training."""
        ...


@runtime_checkable
class SwapsRank(Protocol):
    """A delta whose tensors another saved adapter's can replace in place, up to a declared maximum rank
    (`deltatune.prepare_hotswap`, `deltatune.hotswap_adapter`): its factors are zero-padded to the maximum once,
    and its scale is a tensor, so a new rank or alpha is a change of values, never of shapes or of the graph of
    a compiled model. `hot_swappable_fields` are the config fields a swap may change; every other field must be
    equal. Deltas without this capability swap too, when the new config equals the loaded one."""

    hot_swappable_fields: ClassVar[tuple[str, ...]]

    def pad_to_rank(self, max_rank: int) -> None:
        """Zero-pad the factors to `max_rank` (an exact no-op on the output); called once, before compiling."""
        ...

    def check_swap(self, config: Any, tensors: dict[str, Tensor]) -> None:
        """Raise HotSwapError, naming the problem, when `tensors` (this delta's saved tensors, by their own
        names) of an adapter with `config` cannot be swapped in; change nothing."""
        ...

    def swap_in(self, config: Any, tensors: dict[str, Tensor]) -> None:
        """Write `tensors` into the padded factors in place (zeros beyond their rank) and the new scale."""
        ...


# --- the base layer ----------------------------------------------------------------------------------------------
@runtime_checkable
class QuantizedWeight(Protocol):
    """A frozen base Linear whose weight is stored quantized (`core.quantized.QuantizedLinear`). It is seen as a
    Linear (`core.layers.layer_kind`); its ``weight`` is a dequantized copy to read, never a parameter to train.
    The host writes a merged weight through `requantize_` (lossy, so `AdaptedLayer.merge` asks for
    ``requantize=True`` and `deltatune.merge_quantized` reports the error it adds). Checked on the class
    (`is_quantized`), so a host that forwards attributes to its base layer is not mistaken for one."""

    def dequantized_weight(self, dtype: Any = None) -> Tensor:
        """The (out, in) weight from the stored codes and constants, in `dtype` (default: the model's dtype)."""
        ...

    def requantize_(self, weight: Tensor) -> None:
        """Replace the stored codes and constants by those of `weight` (same shape)."""
        ...

    def storage_bytes(self) -> int:
        """Bytes of the stored weight: codes plus quantization constants (the bias not included)."""
        ...


def is_quantized(module: Any) -> bool:
    """True for a layer whose class has the `QuantizedWeight` capability (not a wrapper that forwards to one)."""
    return issubclass(type(module), QuantizedWeight)


# --- the delta algebra ---------------------------------------------------------------------------------------
@runtime_checkable
class AssignsDeltaWeight(Protocol):
    """A delta whose tensors can be set from a given ΔW (best approximation within its structure); the
    target of `deltatune.combine_adapters`."""

    def assign_delta_weight(self, delta_weight: Tensor) -> None: ...


@runtime_checkable
class AssignsDeltaBias(Protocol):
    """A delta whose bias term (`Delta.delta_bias`) can be set from a given Δb in the base bias's shape."""

    def assign_delta_bias(self, delta_bias: Tensor) -> None: ...


@runtime_checkable
class HasRank(Protocol):
    """A rank-structured delta: `rank` is its live rank now (LoRA: the configured r; the AdaLoRA family: the
    components that count, after the allocator's last step), which sizes a combined LoRA adapter. It bounds
    rank(ΔW) up to the terms a method holds outside its live set (IncreLoRA's 1e-5 reserves while it grows)."""

    @property
    def rank(self) -> int: ...


# --- training ------------------------------------------------------------------------------------------------
@runtime_checkable
class HasLowRankPair(Protocol):
    """A delta whose trainable change reaches the layer only through the product s·B·A of two factors (LoRA,
    PiSSA, OLoRA, DoRA's direction). Update rules (`deltatune.optim`: LoRA+, LoRA-Pro) read it, so they work on
    every method that declares it, never by naming a method."""

    def lowrank_pair(self) -> tuple[nn.Parameter, nn.Parameter, float]:
        """(A, B, s): A with r rows (its matrix view (r, fan_in) is ``A.reshape(r, -1)``), B with r columns (its
        matrix view (out, r) is ``B.reshape(B.shape[0], r)``), and the scale s, such that ∂L/∂A = s·Bᵀ·G and
        ∂L/∂B = s·G·Aᵀ in those views, G being the loss gradient with respect to the matrix s·B·A is added to."""
        ...


@runtime_checkable
class HasRegularizationShare(Protocol):
    """A delta whose `regularization()` is multiplied by `regularization_share`, which an allocator sets to
    1 / (number of regularized tensors) for the official codes' averaged form (`allocate.support`)."""

    regularization_share: float


# --- peft conversion (core.peft_format) ----------------------------------------------------------------------
@runtime_checkable
class PeftConvertibleConfig(Protocol):
    """A method config with a peft equivalent. Checked on the config class (import) or an instance (export)."""

    peft_type: ClassVar[str]

    def to_peft_config(self, target_paths: list[str], extra_paths: list[str]) -> dict[str, Any]:
        """peft's adapter_config.json for an adapter on `target_paths` with extra trainable `extra_paths`."""
        ...

    @classmethod
    def from_peft_config(cls, peft: dict[str, Any], tensor_keys: Iterable[str]) -> Any:
        """The config of a peft folder (every peft field honoured or refused by name)."""
        ...


@runtime_checkable
class HasPeftTensorNames(Protocol):
    """A delta whose tensors have peft names: its tensor name -> peft's key suffix."""

    def peft_tensor_names(self) -> dict[str, str]: ...


# --- config fields shared by several methods (validated and read once, in allocate.support / allocate.slots) ----
@runtime_checkable
class HasDropout(Protocol):
    """A config with dropout on the delta's input."""

    dropout: float


@runtime_checkable
class HasSmoothingFactors(Protocol):
    """A config with the EMA factors of importance scores (AdaLoRA's β1 for sensitivity, β2 for uncertainty)."""

    beta1: float
    beta2: float


@runtime_checkable
class HasOrthogonalRegularizer(Protocol):
    """A config with an orthogonality regularizer: its weight γ and its form ("paper" or "code")."""

    orthogonal_weight: float
    orthogonal_form: str


DELTA_CAPABILITIES = (FusesWithBase, AssignsDeltaWeight, AssignsDeltaBias, HasRank, HasRegularizationShare,
                      HasPeftTensorNames, KeepsBaseInEval, HasLowRankPair, SwapsRank)
CONFIG_CAPABILITIES = (PeftConvertibleConfig, HasDropout, HasSmoothingFactors, HasOrthogonalRegularizer)

_PROTOCOL_MACHINERY = frozenset({"__init__", "__subclasshook__", "__abstractmethods__", "__class_getitem__",
                                 "__init_subclass__", "__parameters__", "__protocol_attrs__",
                                 "__non_callable_proto_members__"})


def protocol_members(protocol: type) -> dict[str, Any]:
    """A protocol's declared members: name -> the function, property or annotation that declares it."""
    members: dict[str, Any] = dict(getattr(protocol, "__annotations__", {}))
    for name, value in vars(protocol).items():
        if name.startswith("_abc") or name.startswith("_is_") or name in _PROTOCOL_MACHINERY:
            continue
        if name.startswith("__") and name.endswith("__"):
            continue
        if callable(value) or isinstance(value, (property, classmethod, staticmethod)):
            members[name] = value
    return members


def declared_signature(protocol: type, name: str) -> inspect.Signature | None:
    """The signature a protocol declares for method `name`, without `self`/`cls` (None for data members)."""
    member = vars(protocol).get(name)
    if isinstance(member, classmethod):
        member = member.__func__
    if not inspect.isfunction(member):
        return None
    signature = inspect.signature(member)
    parameters = list(signature.parameters.values())
    return signature.replace(parameters=parameters[1:])

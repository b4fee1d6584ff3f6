"""Declared capabilities (core/capabilities.py, allocate/protocols.py) hold for every registered method.

Walks the registry: each method's delta (built on a small Linear) and config either hold a capability whole, with
the declared signatures, or have none of its members. Nothing here names a method.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.allocate import protocols as allocator_protocols
from deltatune.core.capabilities import (
    CONFIG_CAPABILITIES,
    DELTA_CAPABILITIES,
    FusesWithBase,
    HasRank,
    declared_signature,
    protocol_members,
)

ALLOCATOR_CAPABILITIES = tuple(
    value for value in vars(allocator_protocols).values()
    if isinstance(value, type) and getattr(value, "_is_runtime_protocol", False)
)
METHODS = [entry.name for entry in dt.list_methods()]
SOURCE = Path(dt.__file__).parent


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(12, 18)  # sizes every method can take (TLoRA splits each into 3 modes, rank 8 < both)

    def forward(self, x: Tensor) -> Tensor:
        return self.first(x)


def _delta(method: str):
    from deltatune.core.layers import MODULE, LayerInfo

    entry = dt.method_entry(method)
    if MODULE in entry.delta_cls.layer_kinds:  # an input-side delta: built for a block of width 8, not adapted
        return entry.delta_cls(dt.config_for(method), LayerInfo(MODULE, 8, 8, (), "Block"), "layers.0")
    model = dt.adapt(Small().double(), dt.config_for(method, targets=["first"]))
    return next(delta for _, _, delta in dt.iter_deltas(model))


def _same_parameters(actual: inspect.Signature, declared: inspect.Signature) -> bool:
    def shape(signature):
        return [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in signature.parameters.values()]

    return shape(actual) == shape(declared)


def capability_problems(obj: object, protocols: tuple[type, ...]) -> list[str]:
    """Every way `obj` half-declares a capability or declares it with another signature."""
    problems = []
    for protocol in protocols:
        members = protocol_members(protocol)
        present = [name for name in members if hasattr(obj, name)]
        if not present:
            continue
        if not isinstance(obj, protocol):
            missing = sorted(set(members) - set(present))
            problems.append(f"{protocol.__name__}: has {present} but not {missing}")
            continue
        for name in members:
            problems += _member_problems(obj, protocol, name)
    return problems


def _member_problems(obj: object, protocol: type, name: str) -> list[str]:
    declared = declared_signature(protocol, name)
    value = getattr(obj, name)
    where = f"{protocol.__name__}.{name}"
    if declared is not None:
        if not callable(value):
            return [f"{where}: declared a method, found {type(value).__name__}"]
        actual = inspect.signature(value)
        if isinstance(obj, type) and inspect.isfunction(inspect.getattr_static(obj, name)):
            actual = actual.replace(parameters=list(actual.parameters.values())[1:])  # unbound: drop self
        return [] if _same_parameters(actual, declared) else [f"{where}: signature {actual}, declared {declared}"]
    if isinstance(vars(protocol).get(name), property):
        owner = type(obj) if not isinstance(obj, type) else obj
        if not isinstance(inspect.getattr_static(owner, name, None), property):
            return [f"{where}: declared a property, found a plain attribute"]
    if callable(value) and not isinstance(value, (Tensor, type)):
        return [f"{where}: declared data, found a method"]
    return []


@pytest.mark.parametrize("method", METHODS)
def test_every_delta_declares_its_capabilities_whole_with_the_declared_signatures(method):
    delta = _delta(method)
    assert capability_problems(delta, DELTA_CAPABILITIES + ALLOCATOR_CAPABILITIES) == []


@pytest.mark.parametrize("method", METHODS)
def test_every_config_declares_its_capabilities_whole_with_the_declared_signatures(method):
    config_cls = dt.method_entry(method).config_cls
    assert capability_problems(config_cls, CONFIG_CAPABILITIES) == []
    assert capability_problems(dt.config_for(method), CONFIG_CAPABILITIES) == []


def test_every_declared_capability_is_held_by_some_registered_method():
    """A capability no method has is dead code; the walk above would check nothing for it."""
    deltas = [_delta(method) for method in METHODS]
    configs = [dt.method_entry(method).config_cls for method in METHODS]
    unused = [p.__name__ for p in DELTA_CAPABILITIES if not any(isinstance(d, p) for d in deltas)]
    unused += [p.__name__ for p in CONFIG_CAPABILITIES if not any(isinstance(c, p) for c in configs)]
    assert unused == []


class _HalfDeclared:
    """Has one member of HasRankComponents only, and a fused forward with the wrong parameters."""

    rank_mask = torch.ones(3, dtype=torch.bool)

    def forward_with_base(self, x):
        return x


class _WholeButWrongKind:
    rank = 3  # HasRank declares a property

    def peft_tensor_names(self, extra):  # declared without parameters
        return {}


def test_the_walk_finds_half_declared_and_misdeclared_capabilities():
    problems = capability_problems(_HalfDeclared(), DELTA_CAPABILITIES + ALLOCATOR_CAPABILITIES)
    assert any(p.startswith("HasRankComponents: has ['rank_mask']") for p in problems), problems
    assert any(p.startswith("FusesWithBase.forward_with_base: signature (x)") for p in problems), problems
    problems = capability_problems(_WholeButWrongKind(), DELTA_CAPABILITIES)
    assert any(p.startswith("HasRank.rank: declared a property") for p in problems), problems
    assert any(p.startswith("HasPeftTensorNames.peft_tensor_names: signature (extra)") for p in problems), problems


def test_a_rank_structured_delta_reports_its_live_rank():
    ranked = [m for m in METHODS if isinstance(_delta(m), HasRank)]
    assert "lora" in ranked and len(ranked) >= 5, ranked
    for method in ranked:
        assert isinstance(_delta(method).rank, int)


def test_fused_deltas_are_found_by_the_host_through_the_capability():
    fused = [m for m in METHODS if isinstance(_delta(m), FusesWithBase)]
    assert fused, "no registered method fuses with its base layer"
    for method in fused:
        model = dt.adapt(Small().double(), dt.config_for(method, targets=["first"]))
        assert model.first._fuse_first_additive or model.first._fuse_weight_delta, method


CAPABILITY_NAMES = sorted({name for p in DELTA_CAPABILITIES + CONFIG_CAPABILITIES for name in protocol_members(p)})
SEARCHED = [SOURCE / "core", SOURCE / "merging", SOURCE / "allocate", SOURCE / "inspect.py"]


def test_no_capability_is_looked_up_by_a_string_in_core_merging_allocate_or_inspect():
    names = "|".join(CAPABILITY_NAMES)
    lookup = re.compile(rf"""(?:hasattr|getattr)\([^()]*["']({names})["']""")
    files = [f for path in SEARCHED for f in ([path] if path.is_file() else sorted(path.rglob("*.py")))]
    found = [f"{f.relative_to(SOURCE)}: {m.group(0)}" for f in files for m in lookup.finditer(f.read_text())]
    assert found == []

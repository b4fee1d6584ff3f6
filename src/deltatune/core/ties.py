"""Weight ties: parameters an adapted layer shares with another module (GPT-2's `lm_head.weight` is
`transformer.wte.weight`).

A delta merged into a shared tensor changes every module that uses it, so `adapt` refuses a target with a tied
parameter unless its config says ``untie=True``: the target then gets its own copy of each shared parameter
(the other modules keep the original tensor) before the delta is attached, and training and merging change
the target only. A module object registered at two paths cannot be untied by copying its parameters (both
paths run the same object) and is always refused. `merge` checks again, because model code may re-tie later
(transformers' `tie_weights()` assigns the shared tensor back).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from deltatune.core.host import AdaptedLayer, plain_path
from deltatune.errors import NotMergeableError, TargetError


@dataclass(frozen=True)
class Tie:
    """Target `path`'s parameter `parameter` is also held as each of `others` (full parameter names)."""

    path: str
    parameter: str
    others: tuple[str, ...]
    same_module: bool  # the whole module object sits at another path too

    @property
    def description(self) -> str:
        return f"{self.path}.{self.parameter!s} is tied to {', '.join(self.others)} (the same tensor)"


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _owner_paths(model: nn.Module) -> tuple[dict[int, list[tuple[str, str]]], dict[int, list[str]]]:
    """id(parameter) -> [(owning module path, parameter name)] and id(module) -> [paths], every registration
    counted. A host's base layer is reported under the host's path, modules inside it under their plain paths."""
    parameters: dict[int, list[tuple[str, str]]] = defaultdict(list)
    modules: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        if path == "base_layer" or path.endswith(".base_layer"):
            continue  # the host's own entry already lists the base layer (below)
        owner = plain_path(model, path)
        modules[id(_base_of(module))].append(owner)
        for name, parameter in _base_of(module).named_parameters(recurse=False):
            parameters[id(parameter)].append((owner, name))
    return parameters, modules


def find_ties(model: nn.Module, paths: list[str]) -> list[Tie]:
    """The tied parameters of the modules at `paths` (each target's own parameters, not its deltas')."""
    parameters, modules = _owner_paths(model)
    ties = []
    for path in paths:
        base = _base_of(model.get_submodule(path))
        twins = tuple(p for p in modules[id(base)] if p != path)
        for name, parameter in base.named_parameters(recurse=False):
            others = tuple(f"{o}.{n}" if o else n for o, n in parameters[id(parameter)] if o != path)
            if others:
                ties.append(Tie(path, name, others, same_module=bool(twins)))
    return ties


def refuse_or_untie(model: nn.Module, paths: list[str], untie: bool, method: str) -> list[Tie]:
    """Raise for tied targets unless `untie`; returns the ties `untie_parameters` must then cut."""
    ties = find_ties(model, paths)
    for tie in ties:
        other_module = tie.others[0].rpartition(".")[0] or tie.others[0]
        if tie.same_module:
            raise TargetError(
                f"{method} cannot adapt {tie.path!r}: the module is registered at {tie.path!r} and also at "
                f"{other_module!r} (one object), so a delta would change both; exclude it from targets"
            )
        if not untie:
            raise TargetError(
                f"{method} cannot adapt {tie.path!r}: {tie.description}, so merging would change "
                f"{other_module!r} too; set untie=True in the config to give "
                f"{tie.path!r} its own copy, or exclude it from targets"
            )
    return ties


def untie_parameters(model: nn.Module, ties: list[Tie]) -> None:
    """Give each tied target its own copy of the shared parameters; the other modules keep the original."""
    for tie in ties:
        base = _base_of(model.get_submodule(tie.path))
        shared = getattr(base, tie.parameter)
        copy = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
        setattr(base, tie.parameter, copy)


def refuse_tied_merge(model: nn.Module, paths: list[str]) -> None:
    """Merging writes into the base tensors: refuse when one of them is (again) shared with another module."""
    ties = find_ties(model, paths)
    if ties:
        tie = ties[0]
        raise NotMergeableError(
            f"cannot merge into {tie.path!r}: {tie.description}, so merging would change that module too; "
            "adapt with untie=True (and do not re-tie the weights afterwards), or keep the adapter unmerged"
        )

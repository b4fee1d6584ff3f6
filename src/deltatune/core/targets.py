"""Which modules of a model to adapt: suffix names, a full-path regex, "all-linear", layer types."""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator

from torch import nn

from deltatune.core.config import ALL_LINEAR, DeltaConfig
from deltatune.core.host import AdaptedLayer
from deltatune.core.layers import CONV1D_HF, KIND_LABELS, LINEAR, layer_kind, target_kind
from deltatune.errors import TargetError, UnsupportedLayerError


def matches_name(path: str, names: Iterable[str]) -> bool:
    """peft's list rule: the dotted path equals a name or ends with "." + name."""
    return any(path == name or path.endswith("." + name) for name in names)


def _is_inside(path: str, names: Iterable[str]) -> bool:
    """True when the path is one of `names`' modules or lies inside one (by suffix on a dot boundary)."""
    parts = path.split(".")
    return any(matches_name(".".join(parts[: i + 1]), names) for i in range(len(parts)))


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the model's output head (transformers' get_output_embeddings), excluded by "all-linear" and by
    targets=None: a head is adapted only when named (it is often tied to the input embeddings)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    return {path for path, module in model.named_modules() if module is head}


def _wanted_by_targets(path: str, module: nn.Module, config: DeltaConfig, heads: set[str]) -> bool:
    targets = config.targets
    if targets == ALL_LINEAR:
        return layer_kind(module) in (LINEAR, CONV1D_HF) and path not in heads
    if targets is None:
        return layer_kind(module) is not None and path not in heads
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return matches_name(path, targets)


def _passes_type_filter(module: nn.Module, layer_types: tuple[str, ...]) -> bool:
    if not layer_types:
        return True
    return layer_kind(module) in layer_types or type(module).__name__ in layer_types


def candidate_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, base layer) for every module of the model, seeing through hosts: an adapted layer counts as its
    base layer, the modules inside a hosted block (VPT, IAA) keep their plain paths, and the host's deltas are
    not candidates."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            base = child.base_layer if isinstance(child, AdaptedLayer) else child
            yield prefix + name, base
            yield from walk(base, f"{prefix}{name}.")

    yield from walk(model, "")


def find_targets(model: nn.Module, config: DeltaConfig, supported_kinds: frozenset[str], method: str) -> list[str]:
    """Dotted paths of the modules `config` selects. Raises a TargetError listing near misses when none match,
    and an UnsupportedLayerError when an explicitly named module is of a kind the method cannot adapt."""
    heads = output_head_names(model)
    chosen, skipped = [], []
    for path, module in candidate_layers(model):
        if _is_inside(path, config.exclude) or _is_inside(path, config.extra_trainable):
            continue
        if not _wanted_by_targets(path, module, config, heads) or not _passes_type_filter(module, config.layer_types):
            continue
        if target_kind(module, supported_kinds) not in supported_kinds:
            if isinstance(config.targets, (tuple, str)) and config.targets != ALL_LINEAR:
                _raise_unsupported(path, module, supported_kinds, method)
            skipped.append((path, module))
            continue
        chosen.append(path)
    if not chosen and skipped:  # the selection holds layers, only none the method can adapt: say that
        _raise_unsupported(*skipped[0], supported_kinds, method)
    if not chosen:
        raise TargetError(_no_match_message(model, config))
    return chosen


def _raise_unsupported(path: str, module: nn.Module, supported: frozenset[str], method: str) -> None:
    kinds = ", ".join(KIND_LABELS[k] for k in sorted(supported))
    raise UnsupportedLayerError(
        f"{method} cannot adapt {path!r} ({type(module).__name__}); it supports {kinds}. "
        "Remove it from `targets` or add it to `exclude`."
    )


def _no_match_message(model: nn.Module, config: DeltaConfig) -> str:
    # Only layers a delta can wrap are worth suggesting: containers ("encoder", "0") would not match either.
    paths = [p for p, m in candidate_layers(model) if layer_kind(m) is not None]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    wanted = config.targets if isinstance(config.targets, tuple) else (str(config.targets),)
    near: list[str] = []
    for name in wanted:
        near += difflib.get_close_matches(name.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.5)
        near += difflib.get_close_matches(name, paths, n=2, cutoff=0.6)
    if near:
        hint = f"near misses: {', '.join(dict.fromkeys(near))}"
    elif paths:
        hint = f"adaptable layer names include: {', '.join(leaves[:12])} (e.g. {paths[0]!r})"
    else:
        hint = "the model has no Linear, Conv or Embedding layer at all"
    types = f" with layer_types={list(config.layer_types)}" if config.layer_types else ""
    return f"targets={config.targets!r}{types} matched no adaptable module; {hint}. Fix `targets`."

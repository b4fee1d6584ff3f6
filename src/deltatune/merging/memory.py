"""Merge in-memory state dicts with any registered method — the same per-tensor functions the streaming layer
runs on checkpoint files, for models that already fit in memory (searches over coefficients, tests, notebooks).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from deltatune.errors import MergeError
from deltatune.merging.algebra.statistics import order_statistics
from deltatune.merging.registry import MergeInputs, merge_method, tensor_generators


def _inputs(name: str, base: Mapping[str, Tensor] | None, models: Sequence[Mapping[str, Tensor]], params: Any,
            model_params: Sequence[Any], seed: int) -> MergeInputs:
    return MergeInputs(name, None if base is None else base[name], [m[name] for m in models], model_params,
                       params, generator=tensor_generators(seed, name), owned=False)


def merge_state_dicts(method: str, base: Mapping[str, Tensor] | None, models: Sequence[Mapping[str, Tensor]],
                      params: Any = None, model_params: Sequence[Any] | None = None, *,
                      seed: int = 0) -> dict[str, Tensor]:
    """Merge `models` (state dicts with the base's keys) with the registered `method`.

    params / model_params: the method's dataclasses (defaults: the paper defaults); whole-model statistics (e.g.
    TIES' `trim_scope="model"`) are computed over all floating tensors. Integer tensors are copied from the base
    (or the first model). Seeds per (tensor, model) make random methods reproducible; the streaming merge of
    the same checkpoints with the same seed gives the same tensors.
    """
    spec = merge_method(method)
    if spec.base == "required" and base is None:
        raise MergeError(f"merge_method {method} needs a base state dict")
    params = params if params is not None else spec.params_cls()
    model_params = list(model_params) if model_params is not None else [spec.model_params_cls() for _ in models]
    if len(model_params) != len(models):
        raise MergeError(f"got {len(model_params)} model_params for {len(models)} models; give one per model")
    if spec.check is not None:
        spec.check(params, model_params)
    reference = base if base is not None else models[0]
    floating = [name for name, value in reference.items() if value.is_floating_point()]
    statistics: dict[str, list[tuple[float, ...]]] = {}
    total = sum(reference[name].numel() for name in floating)
    for request in (spec.statistics(params, model_params) if spec.statistics else []):
        def groups(request=request):
            for name in floating:
                yield request.score(_inputs(name, base, models, params, model_params, seed), statistics)
        statistics[request.key] = order_statistics(groups, [request.ranks(total, i) for i in range(len(models))])
    merged = {}
    for name, value in reference.items():
        if name not in floating:
            merged[name] = value.clone()
            continue
        inputs = _inputs(name, base, models, params, model_params, seed)
        inputs.statistics = statistics
        merged[name] = spec.merge(inputs)
    return merged

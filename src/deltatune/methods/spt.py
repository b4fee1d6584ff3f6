"""SPT: sensitivity-aware parameter-efficient fine-tuning (He et al., ICCV 2023, arXiv:2303.08566).

Two stages. Stage 1 (`plan_spt`, no weight update): the first-order Taylor sensitivity s_w = Σ_batches g_w² of
every entry of every target weight, over `sensitivity_batches` batches; the global top-`budget` entries form a
mask, and each weight counts c = its share of the mask. Stage 2 (`deltatune.adapt(model, planned_config)`), per
target matrix (the official code's allocation rule):

    c >= r (d_in + d_out) / α  ->  a structured delta: LoRA,  y = W x + B A x   (B = 0 at start, scale 1)
    otherwise                  ->  an unstructured delta: W' = W + scatter(δ at the c most sensitive entries)

The sparse delta starts at 0 and trains only its c values through `functional.sparse.sparse_matmul` (no dense
weight gradient, optimizer state for the c values only), as the official sparse-gradient linear does.

Saved tensors per adapted module: unstructured ``indices`` (int64 flat positions in the (out, fan_in) matrix
view, sorted) and ``values``; structured ``lora_A`` (r, fan_in) and ``lora_B`` (out, r). Which module has which
(and how many positions) is in the config (`allocation`, `structured`), so a saved adapter reloads without data.

Deviations: the official code sweeps the budget τ to hit a target trainable count exactly and also tunes whole
norm/bias vectors (`structured_vector`, β = 5); deltatune plans once for the given budget (the real trainable count,
sparse plus LoRA, is `deltatune.trainable_parameters`) and tunes weight matrices only. The structured branch is the
official LoRA one: its output goes through DropPath(0.1) in training (`drop_path`: each sample's branch output is
dropped with probability p and the kept ones scaled by 1/(1 − p); eval uses the plain branch), with no input
dropout (`dropout` adds one, default 0). The official code's other structured form, an adapter (Linear, GELU,
Linear beside the layer: its `structured_type="adapter"`), is not offered: structured matrices get LoRA.
Without a plan (`SPTConfig()` straight into `adapt`), no data has been seen: every matrix gets the budget share
at seeded random positions and a warning says so.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.allocate.selection import (
    check_budget,
    global_top_counts,
    largest_score_positions,
    resolve_budget,
    task_objective,
    taylor_sensitivity,
)
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.host import AdaptedLayer
from deltatune.core.layers import CONV, CONV1D_HF, LINEAR, LayerInfo, base_bias, describe_layer
from deltatune.core.registry import register_method
from deltatune.core.targets import find_targets
from deltatune.errors import ConfigError, config_check
from deltatune.functional.sparse import PatternCache, scatter_matrix, sparse_adapted_linear, sparse_matmul
from deltatune.train.losses import LossFn


@dataclass(frozen=True)
class SPTConfig(DeltaConfig):
    """SPT hyper-parameters.

    Args:
        budget: the number of sensitive entries selected over all targets together: a share of their entries in
            (0, 1) or a count (an integer >= 1).
        lora_rank: r of the structured (LoRA) delta (official: 8).
        structured_ratio: α: a matrix whose sensitive count reaches r (d_in + d_out) / α gets LoRA (official: 10).
        sensitivity_batches: how many batches stage 1 reads (official function default 8; train script 16).
        drop_path: DropPath rate on the LoRA branch's output in training, per sample, in [0, 1) (official: 0.1).
        dropout: input dropout of the LoRA branch, in [0, 1) (not in the official code; default 0).
        allocation: module path -> number of sparse positions (filled by `plan_spt`).
        structured: module paths that get LoRA (filled by `plan_spt`).
        sensitivity: module path -> score tensor of the weight's shape (filled by `plan_spt`; not saved).
        seed: seeds the placeholder positions used when no sensitivity is given.
    """
    budget_field: ClassVar[str | None] = "budget"

    budget: float = 0.01
    lora_rank: int = 8
    structured_ratio: float = 10.0
    sensitivity_batches: int = 8
    drop_path: float = 0.1
    dropout: float = 0.0
    allocation: dict[str, int] | None = None
    structured: tuple[str, ...] = ()
    seed: int = 0
    sensitivity: Mapping[str, Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "structured", tuple(self.structured))
        check_budget(self.budget, "budget")
        config_check(isinstance(self.lora_rank, int) and self.lora_rank > 0, "lora_rank", self.lora_rank,
                     "an integer > 0")
        config_check(self.structured_ratio > 0, "structured_ratio", self.structured_ratio, "a number > 0")
        config_check(isinstance(self.sensitivity_batches, int) and self.sensitivity_batches >= 1,
                     "sensitivity_batches", self.sensitivity_batches, "an integer >= 1")
        config_check(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")
        config_check(0 <= self.drop_path < 1, "drop_path", self.drop_path, "a probability in [0, 1)",
                     "the official code uses 0.1; 0 turns it off")
        if self.allocation is not None:
            config_check(isinstance(self.allocation, Mapping) and all(
                isinstance(v, int) and v >= 0 for v in self.allocation.values()), "allocation", self.allocation,
                "a mapping of module path -> count >= 0", "build it with plan_spt(model, config, batches)")

    def to_dict(self) -> dict[str, Any]:
        """JSON fields; the sensitivity scores are not saved (the chosen positions are, in the adapter file)."""
        return DeltaConfig.to_dict(dataclasses.replace(self, sensitivity=None))

    def is_planned(self) -> bool:
        return self.allocation is not None

    def plan(self, model: Any, batches: Any, loss_fn: LossFn | None = None) -> SPTConfig:
        """Stage 1 (`plan_spt`) unless this config is already planned."""
        return self if self.is_planned() else plan_spt(model, self, batches, loss_fn)


def plan_spt(
    model: nn.Module, config: SPTConfig, batches: Iterable[Any], loss_fn: LossFn | None = None,
) -> SPTConfig:
    """Stage 1: measure sensitivity on the first `config.sensitivity_batches` batches and return the planned
    config (targets narrowed to the modules that got a delta) to pass to `deltatune.adapt`.

    The sensitivity is that of the training loss: `loss_fn(outputs, labels)` as the Trainer takes it; by default
    the model's own `.loss` when its forward takes `labels` (a transformers causal LM), else classification
    cross-entropy (`deltatune.train.losses` has the rules)."""
    weights = _target_weights(model, config)
    batches = itertools.islice(iter(batches), config.sensitivity_batches)
    scores = taylor_sensitivity(model, weights, batches, task_objective(loss_fn))
    infos = {path: _layer_info(model, path) for path in weights}
    matrices = {path: infos[path].to_matrix(score) for path, score in scores.items()}
    budget = resolve_budget(config.budget, sum(s.numel() for s in matrices.values()))
    counts = global_top_counts(matrices, budget)
    structured = tuple(p for p in weights if counts[p] >= _lora_size(infos[p], config.lora_rank)
                       / config.structured_ratio and _lora_fits(infos[p], config.lora_rank))
    allocation = {p: c for p, c in counts.items() if c > 0 and p not in structured}
    chosen = tuple(p for p in weights if p in structured or p in allocation)
    return dataclasses.replace(config, targets=chosen, allocation=allocation, structured=structured,
                               sensitivity=scores)


def _target_weights(model: nn.Module, config: SPTConfig) -> dict[str, Tensor]:
    paths = find_targets(model, config, SPTDelta.layer_kinds, "spt")
    return {path: _base_module(model, path).weight for path in paths}


def _base_module(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path)
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _layer_info(model: nn.Module, path: str) -> LayerInfo:
    return describe_layer(_base_module(model, path))


def _lora_size(layer: LayerInfo, rank: int) -> int:
    return rank * (layer.fan_in + layer.out_features)


def _lora_fits(layer: LayerInfo, rank: int) -> bool:
    return rank < min(layer.fan_in, layer.out_features) and layer.conv_args.get("groups", 1) == 1


@register_method("spt", SPTConfig, "SPT: Taylor sensitivity, global budget, sparse deltas or LoRA per matrix")
class SPTDelta(Delta):
    """SPT: sensitive entries tuned sparsely, or LoRA where a matrix is sensitive enough."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = frozenset({LINEAR, CONV1D_HF, CONV})

    def __init__(self, config: SPTConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        self.matrix_shape = (layer.out_features, layer.fan_in)
        self.is_structured = module_name in config.structured
        if self.is_structured:
            self.lora_A = nn.Parameter(torch.empty(config.lora_rank, layer.fan_in))
            self.lora_B = nn.Parameter(torch.zeros(layer.out_features, config.lora_rank))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        else:
            count = _sparse_count(config, layer, module_name)
            self.values = nn.Parameter(torch.zeros(count))
            self.register_buffer("indices", torch.zeros(count, dtype=torch.int64))
            self._patterns = PatternCache()

    @torch.no_grad()
    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        if self.is_structured:
            return
        count = self.values.numel()
        scores = (self.config.sensitivity or {}).get(self.module_name)
        if scores is not None:
            positions = largest_score_positions(self.layer.to_matrix(scores), count)
        else:
            warnings.warn("SPT without sensitivity: positions are random placeholders; run "
                          "deltatune.methods.spt.plan_spt(model, config, batches) first", stacklevel=2)
            positions = _random_positions(count, base_weight.numel(), self.config.seed, self.module_name)
        self.indices.copy_(positions.to(self.indices.device))

    def forward(self, x: Tensor) -> Tensor:
        if self.is_structured and self.layer.kind != CONV:
            down = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
            return self._drop_path(F.linear(down, self.lora_B)).to(x.dtype)
        if not self.is_structured and self.layer.kind != CONV:
            return sparse_matmul(x, self.values, self._patterns.get(self.indices, self.matrix_shape))
        update = self.layer.op(x, self._dense_update().to(x.dtype), None)  # convolutions: dense ΔW path
        return self._drop_path(update) if self.is_structured else update

    def _drop_path(self, branch: Tensor) -> Tensor:
        """DropPath (stochastic depth) on the LoRA branch, as the official structured module: in training, each
        sample's (dim 0) branch output is kept with probability 1 − p and scaled by 1/(1 − p), so its
        expectation is the branch itself; an unbatched input is one sample."""
        rate = self.config.drop_path
        if not self.training or rate == 0:
            return branch
        keep = 1.0 - rate
        shape = (branch.shape[0],) + (1,) * (branch.dim() - 1) if branch.dim() > 1 else (1,)
        mask = torch.empty(shape, dtype=branch.dtype, device=branch.device).bernoulli_(keep)
        return branch * mask / keep

    def forward_with_base(self, x: Tensor, base_layer: nn.Module) -> Tensor | None:
        """Sparse deltas on Linear/Conv1D: the whole layer x (W + S)ᵀ + b as one node (see functional.sparse)."""
        if self.is_structured or self.layer.kind == CONV:
            return None
        pattern = self._patterns.get(self.indices, self.matrix_shape)
        weight = self.layer.to_matrix(base_layer.weight)
        return sparse_adapted_linear(x, weight, base_bias(base_layer), self.values, pattern)

    def _dense_update(self) -> Tensor:
        if self.is_structured:
            return self.layer.from_matrix(self.lora_B @ self.lora_A)
        return self.layer.from_matrix(scatter_matrix(self.values, self.indices, self.matrix_shape))

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self._dense_update().to(base_weight.dtype)


def _sparse_count(config: SPTConfig, layer: LayerInfo, module_name: str) -> int:
    numel = layer.out_features * layer.fan_in
    if config.allocation is not None:
        if module_name not in config.allocation:
            raise ConfigError(f"allocation has no entry for {module_name!r}: the plan was made for other targets; "
                              "re-run plan_spt on this model")
        return min(config.allocation[module_name], numel)
    if config.budget >= 1:
        raise ConfigError(f"budget={config.budget!r} is a count, which only plan_spt can split across layers; "
                          "pass a share in (0, 1) or plan first")
    count = round(config.budget * numel)
    if count < 1:
        raise ConfigError(f"budget={config.budget!r} selects no entry of {module_name!r} ({numel} entries); "
                          "raise budget or plan with plan_spt")
    return count


def _random_positions(count: int, numel: int, seed: int, module_name: str) -> Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module_name.encode()))
    return torch.randperm(numel, generator=generator)[:count].sort().values

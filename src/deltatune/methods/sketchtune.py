"""SketchTune: fine-tunable weight sketches (Zhang et al., ICML 2025, "Sketch to Adapt", arXiv:2410.06364).

The base weight itself becomes the sketch. Each adapted weight W (its (out, in) matrix view) is replaced by

    codes c ∈ {0, …, 2^b − 1}^{out × in}   frozen, b bits each, packed (b = 4: two codes per byte)
    table V ∈ R^{out × g × 2^b}              trainable: g = groups per row (GPR), each row's columns split into g
                                             contiguous groups, every (row, group) with its own 2^b values
    W̃[i, j] = V[i, group(j), c[i, j]]        and the layer runs x W̃ᵀ + b

Nothing else trains; there is no adapter path. Trainable count = Σ_layers out · g · 2^b (official README: GPR ∈
{1, 2, 4, 8}, 4 bits; its training scripts default to GPR 4). The forward is one gather on the unpacked codes
(`functional.sketch.reconstruct`); autograd's backward of that gather is the paper's scatter-add of ∂L/∂W̃ into V.

The sketching step is NOT released by the authors (they ship pre-sketched Llama checkpoints). deltatune's
substitute, ours and labelled so everywhere: per-(row, group) weighted 1-D k-means with 2^b centroids, started
deterministically at the group's (k + ½)/2^b quantiles, `iterations` Lloyd steps, vectorized over every row and
group at once, in float64; the codes are each weight's nearest centroid. Plain (all weights 1) at `adapt`;
activation-weighted by calibration inputs' second moments diag(XᵀX) with `sketch_with_activations(model,
batches)` (the paper speaks of learned sketching; its authors' LeanQuant line of work weights by such statistics).

Because the sketch is lossy, the adapted model differs from the dense base at step 0 (`preserves_output_at_init
= False`); `reconstruction_error()` reports ‖W − W̃‖_F / ‖W‖_F. The sketch replaces the incoming weight (it does
not read it: `replaces_base_weight = True`), so stacked after another weight-space delta it decides the weight.

Memory, deltatune's deviation on purpose: the host keeps the dense W beside the sketch, so disabling the adapter
gives the dense base and unmerging is exact (the paper discards W: its base is the sketch alone).
`sketch_bytes(model)` counts what the sketched base takes (packed codes + tables), the number the paper reports.
Merge writes W̃ into the base weight and keeps the dense W it overwrote (a non-persistent copy, while merged);
unmerge writes that copy back, exactly. An unmerge without that copy (never merged here) is refused.

Saved tensors per adapted module: ``sketch_codes`` (uint8, the packed codes of the (out, in) view in row-major
order, `functional.sketch.pack_codes` layout: b bytes per 8 codes, little-endian bits; the official kernels store
4-bit codes high nibble first) and ``sketch_table`` (out, g, 2^b) in the base dtype.

Defaults and deviations:
- bits 4 and groups_per_row 4: the official scripts' defaults; bits ∈ {2, 3, 4, 8} (the official kernels take
  b ≤ 4, always in nibbles; here 3-bit codes really take 3/8 byte);
- in_features not divisible by g: contiguous groups whose sizes differ by one (the official kernels need
  in / g to be a multiple of 8); in_features < g is refused;
- Linear and transformers Conv1D (a Linear with a transposed weight); the paper sketches Linear layers only, so
  convolutions and embeddings are refused;
- `cache_weight=True` keeps W̃ between calls while the table is unchanged and no gradient is recorded (eval),
  at the cost of one dense weight per layer; off by default (the sketch's memory is the point).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import CONV1D_HF, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import NotMergeableError, config_check
from deltatune.functional.sketch import (
    SUPPORTED_BITS,
    column_groups,
    pack_codes,
    packed_size,
    reconstruct,
    sketch_matrix,
    unpack_codes,
)

ACTIVATION_FLOOR = 1e-6  # relative floor on diag(XᵀX): a column no calibration input reached still counts a little


@dataclass(frozen=True)
class SketchTuneConfig(DeltaConfig):
    """SketchTune hyper-parameters.

    Args:
        bits: bits per code, one of (2, 3, 4, 8): each (row, group) has 2^bits trainable values.
        groups_per_row: g (the paper's GPR), contiguous column groups per row, each with its own table; the
            trainable count is out · g · 2^bits per layer.
        iterations: Lloyd iterations of our k-means sketching (the paper's sketching step is not released).
        cache_weight: keep the reconstructed weight between no-grad calls while the table is unchanged.
    """

    budget_field: ClassVar[str | None] = "groups_per_row"

    bits: int = 4
    groups_per_row: int = 4
    iterations: int = 10
    cache_weight: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.bits in SUPPORTED_BITS, "bits", self.bits, f"one of {SUPPORTED_BITS}")
        config_check(self.groups_per_row >= 1, "groups_per_row", self.groups_per_row, "an integer >= 1")
        config_check(self.iterations >= 0, "iterations", self.iterations, "an integer >= 0")


@register_method("sketchtune", SketchTuneConfig, "SketchTune: the weight as b-bit codes + trainable per-row-group "
                 "value tables (sketch by our k-means)")
class SketchTuneDelta(Delta):
    """SketchTune: the weight as b-bit codes + trainable per-row-group value tables."""

    kind = DeltaKind.WEIGHT
    layer_kinds = frozenset({LINEAR, CONV1D_HF})
    preserves_output_at_init = False  # the sketch is a lossy copy of W
    replaces_base_weight = True

    def __init__(self, config: SketchTuneConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        groups, columns = config.groups_per_row, layer.in_features
        config_check(groups <= columns, "groups_per_row", groups,
                     f"at most in_features = {columns} for {module_name or layer.type_name}",
                     "lower groups_per_row or exclude this layer")
        count = layer.out_features * columns
        self.sketch_table = nn.Parameter(torch.zeros(layer.out_features, groups, 1 << config.bits))
        self.register_buffer("sketch_codes", torch.zeros(packed_size(count, config.bits), dtype=torch.uint8))
        self.register_buffer("groups_of_columns", column_groups(columns, groups), persistent=False)
        self.register_buffer("merged_from", None, persistent=False)  # the dense W while merged
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None

    @torch.no_grad()
    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        self.sketch(base_weight)

    @torch.no_grad()
    def sketch(self, base_weight: Tensor, column_weights: Tensor | None = None) -> list[float]:
        """(Re)build codes and table from the dense `base_weight` by our k-means, each column's squared error
        weighted by `column_weights` (in,) when given; returns the k-means errors per iteration."""
        matrix = self.layer.to_matrix(base_weight)
        table, codes, errors = sketch_matrix(matrix, self.config.groups_per_row, self.config.bits,
                                             self.config.iterations, column_weights)
        self.sketch_table.copy_(table.to(self.sketch_table.dtype))
        self.sketch_codes.copy_(pack_codes(codes, self.config.bits))
        self._cache = None
        return errors

    def codes(self) -> Tensor:
        """The unpacked codes, (out, in) int64."""
        count = self.layer.out_features * self.layer.in_features
        unpacked = unpack_codes(self.sketch_codes, self.config.bits, count)
        return unpacked.reshape(self.layer.out_features, self.layer.in_features)

    def sketched_matrix(self) -> Tensor:
        """W̃ as the (out, in) matrix, in the table's dtype."""
        return reconstruct(self.sketch_table, self.codes(), self.groups_of_columns)

    def sketched_weight(self) -> Tensor:
        """W̃ in the base weight's native shape."""
        if not self.config.cache_weight or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.layer.from_matrix(self.sketched_matrix())
        key = (self.sketch_table._version, self.sketch_codes._version, self.sketch_table.dtype,
               self.sketch_table.device, self.sketch_table.data_ptr())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.layer.from_matrix(self.sketched_matrix()))
        return self._cache[1]

    def adapted_weight(self, base_weight: Tensor) -> Tensor:
        return self.sketched_weight().to(base_weight.dtype)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self.adapted_weight(base_weight) - base_weight

    def merge_into(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        self.merged_from = weight.detach().clone()
        return self.adapted_weight(weight).detach(), bias

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.merged_from is None:
            raise NotMergeableError(
                f"sketchtune on {self.module_name or self.layer.type_name}: the dense weight this sketch replaced "
                "was not kept (it was not merged in this process); reload the dense base instead of unmerging"
            )
        restored, self.merged_from = self.merged_from, None
        return restored, bias

    def sketch_bytes(self) -> int:
        """Bytes of the sketch: packed codes + table (what replaces the dense weight)."""
        return self.sketch_codes.numel() + self.sketch_table.numel() * self.sketch_table.element_size()

    @torch.no_grad()
    def reconstruction_error(self, base_weight: Tensor) -> float:
        """‖W − W̃‖_F / ‖W‖_F against the dense `base_weight`, in float64."""
        dense = self.layer.to_matrix(base_weight).double()
        return float((dense - self.sketched_matrix().double()).norm() / dense.norm().clamp(min=1e-300))


def sketch_deltas(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module, SketchTuneDelta]]:
    """(path, host, delta) of every SketchTune delta of `adapter` in `model`."""
    from deltatune.core.model import iter_hosts

    return [(path, host, host.deltas[adapter]) for path, host in iter_hosts(model)
            if adapter in host.deltas and isinstance(host.deltas[adapter], SketchTuneDelta)]


def sketch_bytes(model: nn.Module, adapter: str = "default") -> int:
    """Bytes the sketched layers take as sketches (packed codes + value tables), summed over the model."""
    return sum(delta.sketch_bytes() for _, _, delta in sketch_deltas(model, adapter))


@torch.no_grad()
def sketch_with_activations(model: nn.Module, batches: Iterable[Any], adapter: str = "default") -> dict[str, float]:
    """Re-sketch every SketchTune layer of `adapter` with each column's error weighted by the mean square of its
    input over `batches` (diag(XᵀX) / tokens; ours, see the module doc). The inputs are the dense model's (the
    adapter disabled while they are recorded). A batch is called as ``model(**batch)`` if it is a mapping, else
    ``model(batch)``. Returns each layer's relative reconstruction error."""
    from deltatune.core.model import disabled

    found = sketch_deltas(model, adapter)
    moments = {path: _SecondMoment() for path, _, _ in found}
    handles = [host.register_forward_pre_hook(moments[path]) for path, host, _ in found]
    try:
        with disabled(model):
            for batch in batches:
                model(**batch) if isinstance(batch, Mapping) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    for path, host, delta in found:
        weights = moments[path].column_weights()
        delta.sketch(host.base_layer.weight, weights)
        errors[path] = delta.reconstruction_error(host.base_layer.weight)
    return errors


class _SecondMoment:
    """A forward pre-hook summing x_j² per input column over every token it sees."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        flat = x.reshape(-1, x.shape[-1])
        squares = flat.square().sum(dim=0)
        self.total = squares if self.total is None else self.total + squares
        self.tokens += flat.shape[0]

    def column_weights(self) -> Tensor | None:
        if self.total is None:
            return None
        mean = self.total / max(self.tokens, 1)
        return mean + ACTIVATION_FLOOR * float(mean.mean())

"""Layer kinds: what a delta needs to know about the base layer it adapts, and the functional op to run it.

Every supported base layer is seen as a 2-D matrix `(out_features, in_features)` plus a functional op
`op(x, weight, bias)`, so methods never branch on the layer class:

| kind        | torch layer                    | native weight shape        | matrix view            |
| ----------- | ------------------------------ | -------------------------- | ---------------------- |
| `linear`    | nn.Linear                      | (out, in)                  | the weight             |
| `conv1d_hf` | transformers' GPT-2 `Conv1D`   | (in, out) (fan-in first)   | the transposed weight  |
| `conv`      | nn.Conv1d / Conv2d / Conv3d    | (out, in/groups, *kernel)  | (out, in/groups * k)   |
| `embedding` | nn.Embedding                   | (num_embeddings, dim)      | (dim, num_embeddings)  |
| `layer_norm`| nn.LayerNorm                   | normalized_shape           | (C, numel / C)         |
| `batch_norm`| nn.BatchNorm1d / 2d / 3d       | (C,)                       | (C, 1)                 |

A quantized Linear (`core.quantized.QuantizedLinear`, capability `QuantizedWeight`) is of kind `linear` too: its
`weight` reads a dequantized copy, so every delta sees a float (out, in) matrix.

For an embedding, "in" is the vocabulary (a one-hot input) and "out" the embedding dimension, as in peft.

The normalization kinds (`NORM_KINDS`) exist for output deltas that follow a norm (SSF folds into its affine
parameters): C is the channel count (the last entry of LayerNorm's normalized_shape, BatchNorm's num_features),
the weight is the affine scale (None when the norm has no affine parameters), and there is no weight path (a
norm's output is not a function of its weight alone: BatchNorm also reads its running statistics). `ALL_KINDS`
stays the weight-matrix kinds, so methods that declare it do not start wrapping norms.

A last kind, `module`, is any other module (an embedding block, a transformer block, a whole backbone): the
input-side deltas (prompts, VPT) are hosted on it. It has no weight, no functional op and cannot merge; only
a delta that lists `MODULE` in its `layer_kinds` is offered it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.capabilities import is_quantized
from deltatune.errors import UnsupportedLayerError

LINEAR, CONV1D_HF, CONV, EMBEDDING = "linear", "conv1d_hf", "conv", "embedding"
LAYER_NORM, BATCH_NORM = "layer_norm", "batch_norm"
ALL_KINDS = frozenset({LINEAR, CONV1D_HF, CONV, EMBEDDING})  # the weight-matrix kinds
NORM_KINDS = frozenset({LAYER_NORM, BATCH_NORM})
MODULE = "module"  # any other module: hosts input-side deltas only (see the module docstring)
KIND_LABELS = {
    MODULE: "any nn.Module (input-side deltas)",
    LINEAR: "nn.Linear",
    CONV1D_HF: "transformers Conv1D",
    CONV: "nn.Conv1d/2d/3d",
    EMBEDDING: "nn.Embedding",
    LAYER_NORM: "nn.LayerNorm",
    BATCH_NORM: "nn.BatchNorm1d/2d/3d",
}


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (a Linear with a transposed weight), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def layer_kind(module: nn.Module) -> str | None:
    """The kind name of a supported base layer, or None for a layer no delta can wrap."""
    if isinstance(module, nn.Linear) or is_quantized(module):  # a quantized Linear is a Linear
        return LINEAR
    if is_hf_conv1d(module):
        return CONV1D_HF
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, nn.LayerNorm):
        return LAYER_NORM
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d/2d/3d and SyncBatchNorm
        return BATCH_NORM
    return None


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts about one base layer plus its functional op. Holds no reference to the layer itself."""

    kind: str
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]
    type_name: str
    conv_dims: int = 0
    conv_args: dict = field(default_factory=dict)  # stride, padding, dilation, groups
    embedding_args: dict = field(default_factory=dict)  # padding_idx, max_norm, ...

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def fan_in(self) -> int:
        """Inputs seen by one output unit: in_features for dense layers, in/groups * prod(kernel) for convs."""
        if self.kind == CONV:
            return self.weight_shape[1] * math.prod(self.kernel_size)
        return self.in_features

    def to_matrix(self, weight: Tensor) -> Tensor:
        """Native weight -> (out, fan_in) matrix view."""
        if self.kind == CONV1D_HF:
            return weight.T
        if self.kind == EMBEDDING:
            return weight.T
        if self.kind in NORM_KINDS:  # channels last in LayerNorm's normalized_shape
            return weight.reshape(-1, self.out_features).T
        return weight.reshape(weight.shape[0], -1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """(out, fan_in) matrix -> native weight shape (inverse of `to_matrix`)."""
        if self.kind in (CONV1D_HF, EMBEDDING):
            return matrix.T
        if self.kind in NORM_KINDS:
            return matrix.T.reshape(self.weight_shape)
        return matrix.reshape(self.weight_shape)

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Run the base layer's computation with a substitute weight (the weight path)."""
        return _OPS[self.kind](self, x, weight, bias)


def _linear_op(info: LayerInfo, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def _conv1d_hf_op(info: LayerInfo, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = x @ weight
    return out if bias is None else out + bias


_CONV_FUNCS: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_op(info: LayerInfo, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _CONV_FUNCS[info.conv_dims](x, weight, bias, **info.conv_args)


def _embedding_op(info: LayerInfo, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.embedding(x, weight, **info.embedding_args)


def _norm_op(info: LayerInfo, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    raise UnsupportedLayerError(
        f"{info.type_name} has no weight path: a weight-space delta cannot run a normalization layer with a "
        "substitute weight; exclude it from `targets`"
    )


_OPS = {LINEAR: _linear_op, CONV1D_HF: _conv1d_hf_op, CONV: _conv_op, EMBEDDING: _embedding_op,
        LAYER_NORM: _norm_op, BATCH_NORM: _norm_op}


def target_kind(module: nn.Module, supported: frozenset[str]) -> str | None:
    """The kind a delta supporting `supported` would see `module` as: its layer kind, else MODULE when the
    delta takes any module, else None."""
    kind = layer_kind(module)
    if kind is None and MODULE in supported:
        return MODULE
    return kind


def describe_target(module: nn.Module) -> LayerInfo:
    """`describe_layer` for a supported layer; a weightless MODULE description for any other module."""
    if layer_kind(module) is not None:
        return describe_layer(module)
    width = module_width(module)
    return LayerInfo(MODULE, width, width, (), type(module).__name__)


def module_width(module: nn.Module) -> int:
    """The token width of a block or backbone, for prompts: its transformers config's `hidden_size`, else the
    last dimension of its last parameter (a block ends in a LayerNorm or a Linear to the width), else 0. Input-
    side configs take an explicit `hidden_size` where this guess does not fit."""
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    # The block's own parameters: a delta already hosted inside it (`<layer>.deltas.<name>.…`) says nothing of
    # the block's width.
    parameters = [p for name, p in module.named_parameters() if ".deltas." not in f".{name}"]
    return int(parameters[-1].shape[-1]) if parameters and parameters[-1].dim() else 0


def describe_layer(module: nn.Module) -> LayerInfo:
    """Build the LayerInfo of a supported layer (call `layer_kind` first to know it is supported)."""
    kind = layer_kind(module)
    name = type(module).__name__
    if kind in NORM_KINDS:
        return _describe_norm(module, kind, name)
    if kind == LINEAR:  # the shape from the features: a quantized Linear would dequantize to show its weight
        shape = (module.out_features, module.in_features)
        return LayerInfo(kind, module.in_features, module.out_features, shape, name)
    shape = tuple(module.weight.shape)
    if kind == CONV1D_HF:
        return LayerInfo(kind, shape[0], shape[1], shape, name)
    if kind == CONV:
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{name} with padding_mode={module.padding_mode!r} cannot be adapted (only 'zeros' padding runs as a "
                "functional convolution); exclude it from `targets`"
            )
        args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        return LayerInfo(kind, module.in_channels, module.out_channels, shape, name, len(shape) - 2, args)
    if kind == EMBEDDING:
        args = dict(
            padding_idx=module.padding_idx, max_norm=module.max_norm, norm_type=module.norm_type,
            scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse,
        )
        return LayerInfo(kind, module.num_embeddings, module.embedding_dim, shape, name, embedding_args=args)
    raise UnsupportedLayerError(f"unsupported layer type {name}: expected one of {sorted(KIND_LABELS.values())}")


def _describe_norm(module: nn.Module, kind: str, name: str) -> LayerInfo:
    """A norm's channel count C and the shape its affine weight has (or would have, without affine)."""
    shape = tuple(module.normalized_shape) if kind == LAYER_NORM else (module.num_features,)
    return LayerInfo(kind, shape[-1], shape[-1], shape, name)


def base_bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None

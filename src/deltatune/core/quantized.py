"""A frozen base on quantized weights (QLoRA-style): 8-bit per-row absmax or 4-bit NF4, dequantized on the fly.

    report = deltatune.quantize_base(model, bits=4)            # every Linear except the output head, in place
    model = deltatune.adapt(model, LoRAConfig(rank=8, targets=["query", "value"]))   # any delta, as usual
    ...train...
    merge = deltatune.merge_quantized(model)   # dequantize -> add ΔW -> requantize; the error it adds, measured
    # or: deltatune.dequantize_base(model); deltatune.unload(model, merge=True)   # exact float merge

`QuantizedLinear` holds the codes and constants as buffers (so `.to(device)` moves them; nothing here is CPU-
specific) and computes ``x Wᵀ + b`` with W dequantized in the compute dtype at each call (`functional.quantize`
has the math and its references). It is not a subclass of nn.Linear: code that writes ``linear.weight.data``
(weight initializers) must not mistake the dequantized copy for the weight. It is a Linear to deltatune
(capability `core.capabilities.QuantizedWeight`): every delta reads a float weight from it, the host runs the
base through it, and the host writes merged weights back through `requantize_`, in one place.

Training memory: the backward pass recomputes W from the codes (`_DequantizedLinear`) instead of keeping a float
copy per layer for it, as QLoRA's kernels do. Why our own layer and not bitsandbytes / torchao / optimum-quanto:
see benchmarks/results/quantized_base.md (which of them run on CPU with the torch pin, and what they cost).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.capabilities import QuantizedWeight, is_quantized
from deltatune.core.config import ALL_LINEAR
from deltatune.core.host import plain_path
from deltatune.core.model import iter_hosts, unload
from deltatune.core.targets import matches_name, output_head_names
from deltatune.core.ties import refuse_tied_merge
from deltatune.errors import ConfigError, NotMergeableError, TargetError, TrainingError, UnsupportedLayerError
from deltatune.functional import quantize as q

BITS = (4, 8)
COMPUTE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)


class QuantizedLinear(nn.Module):
    """A frozen Linear on a quantized weight: ``F.linear(x, dequantize(codes, constants), bias)``.

    Buffers (the saved format of a quantized model; the adapter file holds none of them):
      - 8-bit: ``weight_codes`` int8 (out, in), ``weight_scale`` float32 (out,) — W ≈ codes · scale[:, None].
      - 4-bit NF4: ``weight_codes`` uint8 (ceil(out·in / 2),), two codes a byte; then ``weight_absmax`` float32
        (n_blocks,), or with double quantization ``absmax_codes`` int8 (n_blocks,), ``absmax_scale`` float32
        (ceil(n_blocks / 256),) and ``absmax_offset`` float32 ().
    ``bias`` stays a float parameter, frozen.

    Args:
        bits: 8 or 4.
        blocksize: NF4 block length (QLoRA: 64). double_quant: quantize the NF4 absmax constants (QLoRA: yes).
        compute_dtype: the dtype W is dequantized to and x @ Wᵀ runs in; None (bitsandbytes' default) follows x.
            The output comes back in x's dtype. `weight` (what deltas are built from and follow) reads in the
            model's dtype (`weight_dtype`, which follows model.to(dtype)), not the compute dtype.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, bits: int = 4, blocksize: int = q.NF4_BLOCKSIZE,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_settings(bits, blocksize, compute_dtype)
        if weight.dim() != 2 or not weight.is_floating_point():
            raise UnsupportedLayerError(f"QuantizedLinear takes a floating (out, in) weight, got {tuple(weight.shape)} "
                                        f"{weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.bits, self.blocksize, self.double_quant, self.compute_dtype = bits, blocksize, double_quant, compute_dtype
        self.weight_dtype = weight.dtype  # what `weight` reads as (without a compute dtype); follows model.to(dtype)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._store(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **settings) -> QuantizedLinear:
        return cls(linear.weight, linear.bias, **settings).to(linear.weight.device)

    # --- storage ------------------------------------------------------------------------------------------
    def _store(self, weight: Tensor) -> None:
        """(Re)compute the codes and constants of `weight`, on its device; the constants in float32 (float64 for a
        float64 weight)."""
        if self.bits == 8:
            codes, scale = q.quantize_int8_rows(weight)
            self._set_buffers(weight_codes=codes, weight_scale=scale)
            return
        codes, absmax = q.quantize_nf4(weight, self.blocksize)
        if not self.double_quant:
            self._set_buffers(weight_codes=codes, weight_absmax=absmax)
            return
        absmax_codes, absmax_scale, absmax_offset = q.quantize_constants(absmax)
        self._set_buffers(weight_codes=codes, absmax_codes=absmax_codes, absmax_scale=absmax_scale,
                          absmax_offset=absmax_offset)

    def _set_buffers(self, **tensors: Tensor) -> None:
        for name, tensor in tensors.items():
            old = self._buffers.get(name)
            # a requantized merge keeps the buffers' dtype and device (a model moved or cast stays so)
            self.register_buffer(name, tensor if old is None else tensor.to(device=old.device, dtype=old.dtype))

    @torch.no_grad()
    def requantize_(self, weight: Tensor) -> None:
        """Store `weight` (out, in) in place of the current one: its codes and constants replace the old ones."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"requantize_ got a weight of shape {tuple(weight.shape)}; this layer is "
                              f"({self.out_features}, {self.in_features})")
        self._store(weight.detach().to(self.weight_codes.device))

    def storage_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers(recurse=False))

    # --- reading ------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        # model.to(dtype) / .half() / .double() change the dtype the weight reads as, not the constants: QLoRA
        # keeps them in float32 (a bfloat16 absmax would add its rounding to every block). Devices move as usual.
        constants = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype, device=self.weight_codes.device)).dtype
        super()._apply(fn, recurse)
        for name, original in constants.items():
            moved = self._buffers[name]
            keep = torch.float64 if torch.float64 in (original.dtype, moved.dtype) else torch.float32
            self._buffers[name] = original.to(device=moved.device, dtype=keep)
        return self

    def _absmax(self, dtype: torch.dtype) -> Tensor:
        if not self.double_quant:
            return self.weight_absmax.to(dtype)
        return q.dequantize_constants(self.absmax_codes, self.absmax_scale, self.absmax_offset, dtype=dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.weight_dtype  # the compute dtype is forward's business (it passes it)
        if self.bits == 8:
            return q.dequantize_int8_rows(self.weight_codes, self.weight_scale, dtype)
        shape = (self.out_features, self.in_features)
        return q.dequantize_nf4(self.weight_codes, self._absmax(dtype), shape, self.blocksize, dtype)

    @property
    def weight(self) -> Tensor:
        """A dequantized copy of the weight (no gradient; writing into it changes nothing: use `requantize_`)."""
        return self.dequantized_weight().detach()

    def __setattr__(self, name: str, value) -> None:
        # nn.Module would try to register a Parameter named `weight` beside the property; refuse in words instead
        if name == "weight":
            raise self._frozen_error("assigned")
        super().__setattr__(name, value)

    def requires_grad_(self, requires_grad: bool = True) -> QuantizedLinear:
        if requires_grad:
            raise self._frozen_error("trained")
        return super().requires_grad_(False)

    def _frozen_error(self, what: str) -> TrainingError:
        return TrainingError(
            f"the weight of this {self.bits}-bit QuantizedLinear is stored quantized and frozen; it cannot be "
            f"{what}. Train a delta on it (deltatune.adapt), or call deltatune.dequantize_base(model) first to get "
            "float weights"
        )

    # --- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _DequantizedLinear.apply(x.to(dtype), bias, self, dtype).to(x.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear with the dequantized weight (in `dtype`, default the dtype the weight reads as)."""
        weight = self.dequantized_weight(dtype or self.weight_dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        form = "int8 per-row absmax" if self.bits == 8 else (
            f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{form}, compute_dtype={self.compute_dtype}")


class _DequantizedLinear(torch.autograd.Function):
    """x Wᵀ + b with W dequantized in forward and again in backward: no float W is kept for the backward pass.
    W itself is frozen (no gradient); x and b get theirs."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: QuantizedLinear, dtype: torch.dtype) -> Tensor:
        ctx.layer, ctx.dtype, ctx.has_bias = layer, dtype, bias is not None
        return F.linear(x, layer.dequantized_weight(dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantized_weight(ctx.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


def _check_settings(bits: int, blocksize: int, compute_dtype: torch.dtype | None) -> None:
    if bits not in BITS:
        raise ConfigError(f"bits={bits!r} is invalid: expected 4 (NF4) or 8 (int8 per-row absmax)")
    if not (isinstance(blocksize, int) and blocksize > 0 and blocksize % 2 == 0):
        raise ConfigError(f"blocksize={blocksize!r} is invalid: expected an even integer > 0 (QLoRA: 64)")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype={compute_dtype!r} is invalid: expected None (follow the input), "
                          "torch.float32, torch.bfloat16, torch.float16 or torch.float64")


# --- model level -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseMemory:
    """Bytes of the base weights that `quantize_base` stored quantized: as stored (codes + constants), and what
    the same weights take in float32 and bfloat16. Biases and the layers left in float are not counted."""

    layers: int
    parameters: int
    stored_bytes: int

    @property
    def float32_bytes(self) -> int:
        return 4 * self.parameters

    @property
    def bfloat16_bytes(self) -> int:
        return 2 * self.parameters

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.stored_bytes / max(self.parameters, 1)

    def __str__(self) -> str:
        return (f"{self.layers} quantized layers, {self.parameters:,} weights: {self.stored_bytes:,} bytes "
                f"({self.bits_per_parameter:.3f} bits/weight) vs {self.float32_bytes:,} float32 "
                f"({self.stored_bytes / max(self.float32_bytes, 1):.3f}x) and {self.bfloat16_bytes:,} bfloat16")


def quantize_base(
    model: nn.Module, bits: int = 4, targets: str | Iterable[str] = ALL_LINEAR, *, blocksize: int = q.NF4_BLOCKSIZE,
    double_quant: bool = True, compute_dtype: torch.dtype | None = None,
) -> BaseMemory:
    """Replace the frozen nn.Linear layers named by `targets` by `QuantizedLinear`s, in place; returns the
    base's memory (`base_memory`). Call it before `deltatune.adapt`.

    `targets`: "all-linear" (every nn.Linear except the output head, as QLoRA quantizes every linear layer of the
    blocks; a task head that will be trained must be left out by naming the others), a list of module names
    (matched by suffix, as in delta configs), or a full-path regex. A matched module that is not an nn.Linear
    is refused, as is a Linear whose weight is shared with another module (quantizing it would untie them).
    """
    _check_settings(bits, blocksize, compute_dtype)
    if any(True for _ in iter_hosts(model)):
        raise ConfigError("quantize_base runs on a model without deltas: call it before deltatune.adapt")
    paths = _quantize_targets(model, targets)
    _refuse_shared_weights(model, paths)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, child)
        quantized = QuantizedLinear.from_linear(linear, bits=bits, blocksize=blocksize, double_quant=double_quant,
                                                compute_dtype=compute_dtype)
        setattr(parent, child, quantized.train(linear.training))
    return base_memory(model)


def _quantize_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    heads = output_head_names(model)
    if targets == ALL_LINEAR:
        paths = [p for p, m in model.named_modules() if type(m) is nn.Linear and p not in heads]
    elif isinstance(targets, str):
        paths = [p for p, m in model.named_modules() if p and re.fullmatch(targets, p)]
    else:
        names = list(targets)
        paths = [p for p, m in model.named_modules() if p and matches_name(p, names)]
    if not paths:
        raise TargetError(f"quantize_base: targets={targets!r} matched no module; name nn.Linear layers "
                          "(suffixes such as 'query', a full-path regex, or 'all-linear')")
    for path in paths:
        module = model.get_submodule(path)
        if type(module) is not nn.Linear:
            raise UnsupportedLayerError(
                f"quantize_base: {path} is a {type(module).__name__}; only nn.Linear layers can be quantized "
                "(leave it out of `targets`)"
            )
    return paths


def _refuse_shared_weights(model: nn.Module, paths: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, parameter in module.named_parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(f"{path}.{name}" if path else name)
    for path in paths:
        shared = owners[id(model.get_submodule(path).weight)]
        if len(set(shared)) > 1:
            raise ConfigError(f"quantize_base: the weight of {path} is shared ({', '.join(sorted(set(shared)))}); "
                              "quantizing it would untie them. Leave it out of `targets`")


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedWeight]]:
    """(path, layer) of every quantized base layer, inside hosts too (paths as in the plain model)."""
    found = []
    for path, module in model.named_modules():
        if is_quantized(module):
            found.append((plain_path(model, path), module))
    return found


def base_memory(model: nn.Module) -> BaseMemory:
    """The stored bytes of the model's quantized base weights vs the same weights in float32 / bfloat16."""
    layers = [layer for _, layer in quantized_layers(model)]
    return BaseMemory(len(layers), sum(layer.out_features * layer.in_features for layer in layers),
                      sum(layer.storage_bytes() for layer in layers))


def dequantize_base(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized base layer by a plain nn.Linear holding its dequantized weight (in `dtype`, default
    the dtype the weight reads as), in place, hosts and their deltas kept. Returns the model. The float reference of
    `merge_quantized`: `dequantize_base` then `deltatune.unload(model, merge=True)` is the exact float merge."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantizedLinear):
                module._modules[child_name] = child.to_linear(dtype).train(child.training)
    return model


@dataclass(frozen=True)
class LayerMergeError:
    """One layer's merge-back error: the requantized merged weight vs the float merge (dequantized W + ΔW)."""

    path: str
    max_abs: float
    mean_abs: float
    relative_frobenius: float  # ‖requantized − float‖_F / ‖float‖_F
    delta_relative_frobenius: float  # ‖ΔW‖_F / ‖float‖_F: how large the change being stored was, for scale
    delta_kept: float  # ⟨requantized − W, ΔW⟩ / ‖ΔW‖²: the share of ΔW the stored weight carries (1: all of it)


@dataclass(frozen=True)
class MergeBackReport:
    """What `merge_quantized` added: per quantized layer and overall (max over layers for max_abs; weighted by
    entries for mean_abs; the Frobenius ratios over all layers' entries together)."""

    layers: tuple[LayerMergeError, ...]
    max_abs: float
    mean_abs: float
    relative_frobenius: float
    delta_relative_frobenius: float
    delta_kept: float

    def __str__(self) -> str:
        hint = ("; a ΔW small against the quantization step is rounded away: pass original_weights, or merge in "
                "float after deltatune.dequantize_base") if self.delta_kept < 0.5 else ""
        return (f"merge-back into {len(self.layers)} quantized layers: max |err| {self.max_abs:.3g}, mean |err| "
                f"{self.mean_abs:.3g}, relative Frobenius {self.relative_frobenius:.3g} (the merged ΔW is "
                f"{self.delta_relative_frobenius:.3g} of the weight; the stored weight keeps {self.delta_kept:.3g} "
                f"of it{hint})")


@torch.no_grad()
def merge_quantized(model: nn.Module, original_weights: Mapping[str, Tensor] | None = None) -> MergeBackReport:
    """Fold the active adapters into the base and remove every wrapper, in place (one way: the rounding of the
    requantized weights cannot be undone). A quantized layer is dequantized, its deltas added (W + ΔW, exactly
    as `deltatune.merge` folds them) and the sum requantized with the layer's own settings; layers left in
    float merge as usual. Every layer or none: a delta that cannot merge refuses before anything is written.

    `original_weights` (module path -> the float weight the layer was quantized from, e.g. the checkpoint's
    state dict with ".weight" keys, or path keys): requantize W_original + ΔW instead. The dequantized W sits
    exactly on the quantization grid, so a ΔW under half a step rounds back to it; W_original does not, and its
    rounding carries ΔW through on average. The float merge the error is measured against is then
    W_original + ΔW. Paths it does not name use the dequantized weight.
    Returns the error the requantization adds, measured against the float merge, and the share of ΔW the stored
    weight keeps (a ΔW below half a quantization step rounds back to the old codes: peft#2321's "different
    generations after merging into 4-bit")."""
    hosts = [(path, host) for path, host in iter_hosts(model) if host._merge_order()]
    if not any(is_quantized(host.base_layer) for _, host in hosts):
        raise NotMergeableError("merge_quantized found no active adapter on a quantized layer; for a float base use "
                                "deltatune.merge or deltatune.unload(model, merge=True)")
    refuse_tied_merge(model, [path for path, _ in hosts])
    for path, host in hosts:
        host.check_mergeable(requantize=True)
        original = _original_weight(original_weights, path)
        if original is not None and tuple(original.shape) != (host.layer.out_features, host.layer.in_features):
            raise NotMergeableError(f"original_weights[{path!r}] has shape {tuple(original.shape)}; the layer is "
                                    f"({host.layer.out_features}, {host.layer.in_features})")
    errors, totals = [], torch.zeros(5, dtype=torch.float64)  # Σ|err|, Σerr², Σfloat², ΣΔW², Σ⟨stored − W, ΔW⟩
    count, worst = 0, 0.0
    for path, host in hosts:
        if not is_quantized(host.base_layer):
            host.merge()
            continue
        base = host.base_layer.dequantized_weight(torch.float64)
        original = _original_weight(original_weights, path)
        _, merged, _ = host.folded(original)
        host.merge(requantize=True, base_weight=original)
        stored, merged = host.base_layer.dequantized_weight(torch.float64), merged.to(torch.float64)
        # ΔW from the weight it was folded into; what the stored weight carries of it, from the old stored one
        change = merged - (base if original is None else original.to(merged.device, torch.float64))
        error = stored - merged
        sums = torch.stack([error.abs().sum(), error.square().sum(), merged.square().sum(), change.square().sum(),
                            ((stored - base) * change).sum()])
        totals += sums.cpu()
        count += error.numel()
        worst = max(worst, float(error.abs().max()))
        errors.append(LayerMergeError(path, float(error.abs().max()), float(sums[0]) / error.numel(),
                                      float((sums[1] / sums[2]).sqrt()), float((sums[3] / sums[2]).sqrt()),
                                      _ratio(sums[4], sums[3])))
    unload(model, merge=True)  # everything is merged already: this only removes the wrappers
    return MergeBackReport(tuple(errors), worst, float(totals[0]) / count, float((totals[1] / totals[2]).sqrt()),
                           float((totals[3] / totals[2]).sqrt()), _ratio(totals[4], totals[3]))


def _original_weight(weights: Mapping[str, Tensor] | None, path: str) -> Tensor | None:
    """The original float weight of the layer at `path` ("path" or "path.weight" keys), or None."""
    if weights is None:
        return None
    found = weights.get(path, weights.get(f"{path}.weight"))
    return None if found is None else found.detach()


def _ratio(numerator: Tensor, denominator: Tensor) -> float:
    """numerator / denominator, 1.0 for an adapter whose ΔW is exactly zero (nothing to keep, nothing lost)."""
    return float(numerator / denominator) if float(denominator) > 0 else 1.0


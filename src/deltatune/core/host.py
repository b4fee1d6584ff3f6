"""AdaptedLayer: one wrapper per adapted base layer holding named deltas, with the two delta paths.

The host keeps the base layer as `base_layer` but reports the base layer's parameters under their original
keys in `state_dict()` (`q.weight`, not `q.base_layer.weight`), so an adapted model's base keys are the base
checkpoint's keys; adapter tensors appear as `q.deltas.<adapter>.<param>`.

Attributes the host does not have itself are read from (and written to) the base layer, so model code that
looks at an adapted layer's ``.weight``, ``.bias``, ``in_features``, ``kernel_size``, ``num_embeddings``,
``padding_idx`` ... keeps working (transformers' ViT reads ``projection.weight.dtype``, weight tying assigns
``lm_head.weight``). The base layer's parameters stay registered on the base layer only.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deltatune.core.capabilities import FusesWithBase, is_quantized
from deltatune.core.delta import COMPOSITION_ORDER, Delta, DeltaKind
from deltatune.core.layers import LayerInfo, base_bias
from deltatune.errors import DeltatuneError, NotMergeableError, RoutingError

_BASE = "base_layer."
# The host's own fields: never forwarded to the base layer, even if a base layer happened to have one.
_OWN_FIELDS = frozenset({
    "base_layer", "layer", "deltas", "active", "merged", "disabled", "_plan", "_live", "_fuse_first_additive",
    "_fuse_weight_delta", "_layer_live", "routes",
})


@dataclass(frozen=True)
class RoutedGroups:
    """What one host runs for a routed batch: (delta, row indices) per adapter that has a delta on this layer,
    split by kind, and each kind's rows concatenated in the same order (the index of one scatter)."""

    batch_size: int
    additive: tuple[tuple[Delta, Tensor], ...] = ()
    output: tuple[tuple[Delta, Tensor], ...] = ()
    additive_rows: Tensor | None = None
    output_rows: Tensor | None = None


class AdaptedLayer(nn.Module):
    """A base layer plus named deltas. Forward composes the active, unmerged deltas in `COMPOSITION_ORDER`."""

    def __init__(self, base_layer: nn.Module, layer: LayerInfo) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.deltas = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.disabled = False
        self._plan: dict[DeltaKind, tuple[Delta, ...]] = {}
        self._live = False
        self._fuse_first_additive = False
        self._fuse_weight_delta = False
        self._layer_live = False
        # Per-sample routing (`core.routing.route`): None, or the (delta, rows) groups of the batch being run.
        self.routes: RoutedGroups | None = None
        self.register_state_dict_post_hook(_base_keys_on_save)
        self.register_load_state_dict_pre_hook(_base_keys_on_load)
        self.train(base_layer.training)  # a layer of a model in eval mode stays in eval mode

    # --- the base layer's attributes -----------------------------------------------------------------------
    def __getattr__(self, name: str):
        # Called only when normal lookup fails. nn.Module's own lookup (parameters, buffers, children such as
        # `base_layer` and `deltas`) comes first; then the base layer answers. `_modules` is read from __dict__
        # because during copy/unpickling it may not exist yet (no recursion then).
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name in _OWN_FIELDS:
                raise
            return getattr(base, name)

    def __setattr__(self, name: str, value) -> None:
        # Writes to an attribute the base layer has (`weight = tied_parameter`, `num_embeddings = n`) go to the
        # base layer, so the host never grows a second `weight` beside `base_layer.weight`.
        if _belongs_to_base(self, name):
            setattr(self.__dict__["_modules"]["base_layer"], name, value)
        else:
            super().__setattr__(name, value)

    # --- membership -----------------------------------------------------------------------------------------
    def add_delta(self, name: str, delta: Delta) -> None:
        # A delta joins in the layer's mode: adapting (or loading into) a model in eval mode must not switch
        # on the new delta's dropout or DropPath.
        self.deltas[name] = delta.train(self.training)
        self._replan()

    def remove_delta(self, name: str) -> None:
        if name in self.merged:
            raise DeltatuneError(f"adapter {name!r} is merged into {self.layer.type_name}; unmerge it first")
        del self.deltas[name]
        self.active = tuple(n for n in self.active if n != name)
        self._replan()

    def set_active(self, names: Iterable[str]) -> None:
        if self.merged:
            raise DeltatuneError(
                f"adapters {list(self.merged)} are merged; call deltatune.unmerge(model) before changing the active set"
            )
        self.active = tuple(n for n in names if n in self.deltas)
        self._replan()

    def _replan(self) -> None:
        """Precompute the per-kind delta lists once, so forward does no bookkeeping."""
        live = [self.deltas[n] for n in self.active if n not in self.merged]
        self._plan = {kind: tuple(d for d in live if d.kind is kind) for kind in COMPOSITION_ORDER}
        self._live = bool(live)
        self._layer_live = any(self._plan[kind] for kind in COMPOSITION_ORDER if kind is not DeltaKind.INPUT)
        # Capability `FusesWithBase` (core.capabilities): an additive delta that can compute the base output and its
        # own term together (one fused autograd node, see functional.lowrank.lowrank_linear). Only when the base
        # runs with its own weight, i.e. no weight-space delta comes first.
        additive = self._plan[DeltaKind.ADDITIVE]
        self._fuse_first_additive = (
            not self._plan[DeltaKind.WEIGHT] and bool(additive) and isinstance(additive[0], FusesWithBase)
        )
        # A lone weight-space delta with `FusesWithBase` computes base_op(x, W') on its activation path (DoRA),
        # without forming W'; several chain on the weight path.
        weight = self._plan[DeltaKind.WEIGHT]
        self._fuse_weight_delta = len(weight) == 1 and isinstance(weight[0], FusesWithBase)

    # --- forward --------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.routes is not None:  # one attribute test: the cost of routing when it is not used
            return self._forward_routed(*args, **kwargs)
        if self.disabled or not self._live:
            return self.base_layer(*args, **kwargs)
        if self._plan[DeltaKind.INPUT]:
            return self._forward_with_inputs_changed(self._plan[DeltaKind.INPUT], args, kwargs)
        return self._forward_layer_deltas(*args, **kwargs)

    def _forward_with_inputs_changed(self, input_deltas: tuple[Delta, ...], args: tuple, kwargs: dict):
        """The first INPUT delta is outermost: each wraps the call of the next, the last wraps the layer."""
        head, rest = input_deltas[0], input_deltas[1:]
        if rest:
            return head.forward_around(
                self.base_layer, lambda *a, **k: self._forward_with_inputs_changed(rest, a, k), args, kwargs
            )
        return head.forward_around(self.base_layer, self._layer_forward, args, kwargs)

    def _layer_forward(self, *args, **kwargs):
        """The base module with the layer deltas (weight, additive, output); any call signature when there are
        none (a MODULE host), else the layer's one tensor input."""
        if not self._layer_live:
            return self.base_layer(*args, **kwargs)
        return self._forward_layer_deltas(*args, **kwargs)

    def _forward_layer_deltas(self, x: Tensor) -> Tensor:
        additive = self._plan[DeltaKind.ADDITIVE]
        y = additive[0].forward_with_base(x, self.base_layer) if self._fuse_first_additive else None
        if y is None:
            y = self._base_output(x)
        else:
            additive = additive[1:]
        for delta in additive:
            y = y + delta(x)
        for delta in self._plan[DeltaKind.OUTPUT]:
            y = delta.transform_output(y)
        return y

    def _forward_routed(self, *args, **kwargs):
        """Each sample (row of the batch) through its own adapter's delta on this layer, or none: the base output
        for all rows, then the additive terms of each group's rows added in one `index_add`, then the output
        transforms of each group's rows written back in one `index_copy`."""
        routes = self.routes
        if not routes.additive and not routes.output:
            return self.base_layer(*args, **kwargs)
        (x,) = args
        if x.shape[0] != routes.batch_size:
            raise RoutingError(f"{self.layer.type_name} got a batch of {x.shape[0]} rows but {routes.batch_size} "
                               "adapter names were routed; pass one name per sample of the batch")
        y = self.base_layer(x)
        if routes.additive:
            # a term may broadcast over its rows (BitFit's Δb): expanded to the rows it is added to
            terms = [delta(x.index_select(0, rows)).to(y.dtype).expand(len(rows), *y.shape[1:])
                     for delta, rows in routes.additive]
            y = y.index_add(0, routes.additive_rows, torch.cat(terms))
        if routes.output:
            outputs = [delta.transform_output(y.index_select(0, rows)) for delta, rows in routes.output]
            y = y.index_copy(0, routes.output_rows, torch.cat(outputs).to(y.dtype))
        return y

    def _base_output(self, x: Tensor) -> Tensor:
        """The base layer's output, run with the weight-space deltas applied to its weight, if any."""
        weight_deltas = self._plan[DeltaKind.WEIGHT]
        if not weight_deltas:
            return self.base_layer(x)
        if self._fuse_weight_delta:
            y = weight_deltas[0].forward_with_base(x, self.base_layer)
            if y is not None:
                return y
        weight = self.base_layer.weight
        for delta in weight_deltas:
            weight = delta.adapted_weight(weight)
        return self.layer.op(x, weight, base_bias(self.base_layer))

    # --- merging --------------------------------------------------------------------------------------------
    def _merge_order(self) -> list[str]:
        live = [n for n in self.active if n not in self.merged]
        return sorted(live, key=lambda n: COMPOSITION_ORDER.index(self.deltas[n].kind))

    def check_mergeable(self, requantize: bool = False) -> None:
        """Raise NotMergeableError if an active, unmerged delta declares itself not mergeable, or if the base
        weight is quantized and `requantize` is False (writing it back rounds it: unmerge could not restore it)."""
        order = self._merge_order()
        for name in order:
            self.deltas[name]._require_mergeable()
        if order and not requantize and is_quantized(self.base_layer):
            bits = getattr(self.base_layer, "bits", "?")
            raise NotMergeableError(
                f"the base weight of this {self.layer.type_name} is quantized ({bits}-bit): merging requantizes it"
                " and unmerge could not restore it. Use deltatune.merge_quantized(model) (one way, "
                "reports the error it adds), or deltatune.dequantize_base(model) first for an exact float merge"
            )

    def folded(self, base_weight: Tensor | None = None) -> tuple[tuple[str, ...], Tensor | None, Tensor | None]:
        """(names, weight, bias): the active, unmerged deltas folded into the (dequantized) base weight and bias
        in composition order, nothing written. Raises NotMergeableError as `check_mergeable` does (deltas only).
        `base_weight`: fold into this weight instead (a quantized base's original float weight)."""
        order = tuple(self._merge_order())
        if not order:
            return order, None, None
        weight, bias = _detached_weight(self), _detached_bias(self)
        if base_weight is not None:
            if tuple(base_weight.shape) != tuple(weight.shape):
                raise NotMergeableError(f"base_weight has shape {tuple(base_weight.shape)}; this "
                                        f"{self.layer.type_name}'s weight is {tuple(weight.shape)}")
            weight = base_weight.detach().to(device=weight.device, dtype=weight.dtype)
        for name in order:
            weight, bias = self.deltas[name].merge_into(weight, bias)
            self._check_bias(bias, name)
        return order, weight, bias

    @torch.no_grad()
    def merge(self, requantize: bool = False, base_weight: Tensor | None = None) -> tuple[str, ...]:
        """Fold every active, unmerged delta into the base weight and bias, in composition order; return their
        names. All or nothing: the folded (weight, bias) is computed first and written once, so a delta that
        refuses leaves the layer as it was. A quantized base is written back requantized only with
        `requantize=True` (see `check_mergeable`), folded into `base_weight` when given (see `folded`)."""
        self.check_mergeable(requantize)
        order, weight, bias = self.folded(base_weight)
        if not order:
            return order
        self._write_base(weight, bias)
        self.merged = self.merged + order
        self._replan()
        return order

    @torch.no_grad()
    def unmerge(self, count: int | None = None) -> None:
        """Undo `merge` in reverse order (only the last `count` merged deltas when given)."""
        names = self.merged if count is None else self.merged[len(self.merged) - count:]
        if not names:
            return
        weight, bias = _detached_weight(self), _detached_bias(self)
        for name in reversed(names):
            weight, bias = self.deltas[name].unmerge_from(weight, bias)
            self._check_bias(bias, name)
        self._write_base(weight, bias)
        self.merged = self.merged[: len(self.merged) - len(names)]
        self._replan()

    def _check_bias(self, bias: Tensor | None, name: str) -> None:
        if bias is not None and base_bias(self.base_layer) is None:
            raise NotMergeableError(
                f"adapter {name!r} changes the bias of a {self.layer.type_name} that has none; keep it unmerged"
            )

    def _write_base(self, weight: Tensor | None, bias: Tensor | None) -> None:
        # The one place a base weight is written: a quantized base stores it requantized (capability
        # `QuantizedWeight`); its `weight` is a dequantized copy, and copying into that would change nothing.
        if is_quantized(self.base_layer):
            self.base_layer.requantize_(weight)
        elif weight is not None:  # None: a norm without affine parameters, left as it is
            self.base_layer.weight.copy_(weight)
        if bias is not None:
            base_bias(self.base_layer).copy_(bias)


def _belongs_to_base(host: AdaptedLayer, name: str) -> bool:
    """True for attributes the base layer owns and the host does not (neither a host field, nor on its class)."""
    base = host.__dict__.get("_modules", {}).get("base_layer")
    if base is None or name in _OWN_FIELDS or name in host.__dict__ or hasattr(type(host), name):
        return False
    own_tables = (host.__dict__.get("_parameters", {}), host.__dict__.get("_buffers", {}), host.__dict__["_modules"])
    if any(name in table for table in own_tables):
        return False
    return name in base.__dict__ or name in base._parameters or name in base._buffers or name in base._modules


def _detached_weight(host: AdaptedLayer) -> Tensor | None:
    """The base weight, or None for a layer without one (a LayerNorm/BatchNorm without affine parameters)."""
    weight = getattr(host.base_layer, "weight", None)
    return None if weight is None else weight.detach()


def _detached_bias(host: AdaptedLayer) -> Tensor | None:
    bias = base_bias(host.base_layer)
    return None if bias is None else bias.detach()


def _base_keys_on_save(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _BASE)]:
        state_dict[prefix + key[len(prefix) + len(_BASE):]] = state_dict.pop(key)


def _base_keys_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # Every key of the base module, its children's too: a host on a block (VPT, IAA) saves the block's whole
    # state under the plain keys (and a host nested inside it has already made its own keys plain).
    for name in module.base_layer.state_dict(keep_vars=True):
        if prefix + name in state_dict:
            state_dict[prefix + _BASE + name] = state_dict.pop(prefix + name)


def plain_path(model: nn.Module, path: str) -> str:
    """`path` (as `model.named_modules()` gives it) without the `base_layer` steps that go through a host into
    its base module: the path the module has in the plain model."""
    if _BASE not in path + ".":
        return path
    module, kept = model, []
    for part in path.split("."):
        if isinstance(module, AdaptedLayer) and part == "base_layer":
            module = module.base_layer
            continue
        module = module._modules[part]
        kept.append(part)
    return ".".join(kept)

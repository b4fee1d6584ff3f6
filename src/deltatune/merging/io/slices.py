"""The `slices:` form: output layers taken from layer ranges of the sources, renumbered, and merged slice by slice.

mergekit 0.1.5's semantics (its `MergePlanner.plan_module` / `plan_slice`), for any registered method:

- the output's numbered layers are the slices in order; slice s contributes `end − start` layers (every source of
  one slice gives the same count), and output layer n + k takes layer `start_j + k` of each source j of the slice
  it falls in, so `[0, 3]` + `[1, 4]` of a 4-layer model is 6 layers: source layers 0 1 2 1 2 3;
- tensors outside the numbered layers are taken from the first slice's sources if they come before the layers
  (embeddings) and from the last slice's sources otherwise (final norm, head);
- parameters: a source's `parameters`, then its slice's, then the top level's; a gradient runs over the slice,
  t = k / (length − 1) (1 for a one-layer slice), and the non-layer tensors use t = 0; filters see the output
  tensor name for shared parameters and each source's own tensor name for per-model ones;
- a method that uses a base takes it from the slice's `base_model` (default: the top-level one), which must be
  one of that slice's sources (mergekit: "Base input is not present in merge inputs");
- the output config.json is the base's (or the first source's) with `num_hidden_layers` set to the total.

Where this file differs: mergekit finds layers and the embedding/head split from per-architecture JSON
templates and copies only the tensors those list; here a layer is any tensor named `…layers.N.…` (also
`layer.`, `h.`, `blocks.`, `block.`), every tensor of a layer is carried (biases, buffers included), and a
non-layer tensor counts as "before the layers" when its name contains `embed`, `wte` or `wpe` (not `embed_out`,
GPT-NeoX's head): mergekit's split for every single-stack architecture it lists, except two position buffers
(ChatGLM's rotary `inv_freq`, Jais' ALiBi slopes) that are the same in every model of one architecture. Output
config: mergekit takes a set-ordered "first referenced model" when there is no base_model; here it is the first
slice's first source. A per-layer `layer_types` list in config.json is renumbered with the layers (mergekit leaves it).
mergekit pairs the last slice's sources with the first slice's count of tensor names for the final tensors (a
last slice with more sources loses the extra ones); here every source of the last slice is used.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.errors import MergeError
from deltatune.merging.config.parse import MergeConfig, OutputSlice
from deltatune.merging.config.resolve import LAYER_PATTERN, ParameterResolver
from deltatune.merging.io.checkpoint import Checkpoint, OutputTensor, TensorInfo
from deltatune.merging.io.validate import read_model_config
from deltatune.merging.registry import MergeMethodSpec

BEFORE_LAYERS = ("embed", "wte", "wpe")  # non-layer tensors taken from the first slice (module docstring)
AFTER_LAYERS = ("embed_out",)  # GPT-NeoX's output head, despite its name
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class TensorSource:
    """One input tensor: which checkpoint, under which name."""

    checkpoint: Checkpoint
    name: str

    @property
    def info(self) -> TensorInfo:
        return self.checkpoint.tensors[self.name]


@dataclass(frozen=True)
class TensorRoute:
    """Where one output tensor's inputs come from, and the parameters it is merged with."""

    base: TensorSource | None
    models: tuple[TensorSource, ...]
    params: Any
    model_params: tuple[Any, ...]

    def inputs(self) -> list[TensorSource]:
        return ([self.base] if self.base is not None else []) + list(self.models)


@dataclass
class LayerLayout:
    """A checkpoint's tensor names split into one stack of numbered layers and the tensors around it."""

    stack: str | None  # the name up to the layer number, e.g. "model.layers."
    layers: list[dict[str, str]]  # per layer: the name after the number (".mlp.up_proj.weight") -> full name
    before: list[str]
    after: list[str]


@dataclass
class SlicedPlan:
    """What the streaming layer needs from a `slices:` config (see `deltatune.merging.io.stream.plan_merge`)."""

    checkpoints: list[Checkpoint]
    outputs: list[OutputTensor] = field(default_factory=list)
    routes: dict[str, TensorRoute] = field(default_factory=dict)
    working_dtype: dict[str, torch.dtype] = field(default_factory=dict)
    config_updates: dict[str, Any] = field(default_factory=dict)


def _before_layers(name: str) -> bool:
    return any(m in name for m in BEFORE_LAYERS) and not any(m in name for m in AFTER_LAYERS)


def layer_layout(checkpoint: Checkpoint) -> LayerLayout:
    """Split `checkpoint`'s tensors; a MergeError if the layers are not one stack numbered 0..n−1."""
    stacks: dict[str, dict[int, dict[str, str]]] = {}
    before, after = [], []
    for name in checkpoint.names_in_file_order():
        match = LAYER_PATTERN.search(name)
        if match is None:
            (before if _before_layers(name) else after).append(name)
            continue
        layers = stacks.setdefault(name[:match.start(1)], {})
        layers.setdefault(int(match.group(1)), {})[name[match.end(1):]] = name
    if len(stacks) > 1:
        raise MergeError(f"{checkpoint.label} {checkpoint.path} has {len(stacks)} stacks of numbered layers "
                         f"({', '.join(sorted(stacks))}); slices: stacks one (mergekit's modules: form is not "
                         "supported)")
    if not stacks:
        raise MergeError(f"{checkpoint.label} {checkpoint.path} has no numbered layers (…layers.N.…); slices: "
                         "needs a layered model, use models: to merge it whole")
    (stack, layers), = stacks.items()
    missing = sorted(set(range(max(layers) + 1)) - set(layers))
    if missing:
        raise MergeError(f"{checkpoint.label} {checkpoint.path}: layer {missing[0]} of {stack}0..{max(layers)} has "
                         "no tensors; the checkpoint is incomplete, re-save it")
    return LayerLayout(stack, [layers[index] for index in range(len(layers))], before, after)


def _open(config: MergeConfig) -> tuple[dict[Path, Checkpoint], list[Checkpoint]]:
    by_path: dict[Path, Checkpoint] = {}
    for index, output_slice in enumerate(config.slices):
        for number, source in enumerate(output_slice.sources):
            if source.path not in by_path:
                by_path[source.path] = Checkpoint(source.path, f"slices[{index}].sources[{number}]")
    return by_path, list(by_path.values())


def _check_bounds(config: MergeConfig, layouts: Mapping[Path, LayerLayout], by_path: Mapping[Path, Checkpoint]):
    for index, output_slice in enumerate(config.slices):
        for number, source in enumerate(output_slice.sources):
            count = len(layouts[source.path].layers)
            if source.layer_range[1] > count:
                raise MergeError(f"slices[{index}].sources[{number}].layer_range={list(source.layer_range)} is out "
                                 f"of bounds: {by_path[source.path].path} has {count} layers (0..{count - 1}); "
                                 f"the end is exclusive, at most {count}")


def _check_layer(reference: dict[str, TensorInfo], checkpoint: Checkpoint, layer: dict[str, str], where: str) -> None:
    """Every stacked layer must have the reference layer's tensors and shapes, or the output is no one model."""
    missing = sorted(set(reference) - set(layer))
    extra = sorted(set(layer) - set(reference))
    if missing or extra:
        tail, how = (missing[0], "lacks") if missing else (extra[0], "has an extra")
        raise MergeError(f"{where}: {checkpoint.path} {how} layer tensor '…{tail}' compared with the first "
                         "slice's layers; stack layers of one architecture")
    for tail, name in layer.items():
        shape = checkpoint.tensors[name].shape
        if shape != reference[tail].shape:
            raise MergeError(f"{where}: tensor {name!r} of {checkpoint.path} has shape {shape}, the first slice's "
                             f"layers have {reference[tail].shape}; stack layers of one architecture")


class _Planner:
    """Builds the routes of every output tensor, in output order: before-layer tensors, layers, after-layer."""

    def __init__(self, config: MergeConfig, spec: MergeMethodSpec, by_path: dict[Path, Checkpoint],
                 layouts: dict[Path, LayerLayout]) -> None:
        self.config, self.spec, self.by_path, self.layouts = config, spec, by_path, layouts
        self.resolver = ParameterResolver(config, None)
        first = config.slices[0].sources[0]
        self.reference = by_path[first.path]
        self.layout = layouts[first.path]
        template = self.layout.layers[first.layer_range[0]]
        self.template = {tail: self.reference.tensors[name] for tail, name in template.items()}
        self.plan = SlicedPlan(list(by_path.values()))

    def _split(self, index: int, output_slice: OutputSlice) -> tuple[int | None, list[int]]:
        """(position of the slice's base among its sources or None, positions of the merged models)."""
        positions = list(range(len(output_slice.sources)))
        base_path = None if self.spec.base == "unused" else output_slice.base_model or self.config.base_model
        if base_path is None:
            if self.spec.base == "required":
                raise MergeError(f"slices[{index}]: merge_method {self.spec.name} needs a base_model (top level or "
                                 "per slice), listed among the slice's sources")
            return None, positions
        found = [j for j in positions if output_slice.sources[j].path == base_path]
        if not found:
            raise MergeError(f"slices[{index}]: base_model {base_path} is not one of this slice's sources; add it "
                             f"with a layer_range of {output_slice.length} layers (mergekit requires the same)")
        models = [j for j in positions if j != found[0]]
        if len(models) < self.spec.min_models:
            raise MergeError(f"slices[{index}]: merge_method {self.spec.name} needs at least {self.spec.min_models} "
                             f"source(s) besides the base, got {len(models)}")
        return found[0], models

    def add(self, out_name: str, names: Sequence[str], index: int, t: float) -> None:
        """Route output tensor `out_name` from the sources of slice `index` (source j's tensor `names[j]`)."""
        output_slice = self.config.slices[index]
        base, models = self._split(index, output_slice)
        sources = [TensorSource(self.by_path[s.path], name) for s, name in zip(output_slice.sources, names)]
        self._check_group(out_name, sources, index)
        scopes = [output_slice.parameters, self.config.parameters]
        info = sources[0].info
        params, model_params = None, []
        if info.dtype.is_floating_point:
            params, model_params = self.resolver.resolve_scopes(
                out_name, scopes, [(names[j], [output_slice.sources[j].parameters, *scopes]) for j in models], t)
            self._refuse_statistics(params, model_params)
            self.plan.working_dtype[out_name] = self.config.dtype or info.dtype
        out_dtype = self.config.out_dtype or self.plan.working_dtype.get(out_name, info.dtype)
        self.plan.outputs.append(OutputTensor(out_name, out_dtype if info.dtype.is_floating_point else info.dtype,
                                              info.shape))
        self.plan.routes[out_name] = TensorRoute(None if base is None else sources[base],
                                                 tuple(sources[j] for j in models), params, tuple(model_params))

    def _check_group(self, out_name: str, sources: list[TensorSource], index: int) -> None:
        for source in sources:
            if source.name not in source.checkpoint.tensors:
                raise MergeError(f"slices[{index}]: {source.checkpoint.path} has no tensor {source.name!r} (needed "
                                 f"for {out_name!r}); merge checkpoints of the same architecture")
        first = sources[0]
        cast = self.config.dtype is not None or not first.info.dtype.is_floating_point
        for source in sources[1:]:
            if source.info.shape != first.info.shape:
                raise MergeError(f"slices[{index}]: tensor {source.name!r} has shape {source.info.shape} in "
                                 f"{source.checkpoint.path} but {first.info.shape} in {first.checkpoint.path}")
            if source.info.dtype != first.info.dtype and not cast:
                raise MergeError(f"slices[{index}]: tensor {source.name!r} is {source.info.dtype} in "
                                 f"{source.checkpoint.path} but {first.info.dtype} in {first.checkpoint.path}; set "
                                 "dtype: (e.g. float32) in the config to cast all inputs")

    def _refuse_statistics(self, params: Any, model_params: list[Any]) -> None:
        if self.spec.statistics is not None and self.spec.statistics(params, model_params):
            raise MergeError(f"merge_method {self.spec.name} with these parameters needs whole-model statistics, "
                             "which the slices: form does not compute; use the per-tensor setting (e.g. ties' "
                             "trim_scope: tensor, mergekit's) or the models: form")

    def run(self) -> SlicedPlan:
        for name in self.layout.before:
            self.add(name, [name] * len(self.config.slices[0].sources), 0, 0.0)
        layer_types: list[Any] = []
        reference_types = self._layer_types()
        out_layer = 0
        for index, output_slice in enumerate(self.config.slices):
            for offset in range(output_slice.length):
                t = offset / (output_slice.length - 1) if output_slice.length > 1 else 1.0
                self._add_layer(index, output_slice, offset, out_layer, t)
                if reference_types is not None:
                    layer_types.append(reference_types[output_slice.sources[0].layer_range[0] + offset])
                out_layer += 1
        for name in self.layout.after:
            self.add(name, [name] * len(self.config.slices[-1].sources), len(self.config.slices) - 1, 0.0)
        self.plan.config_updates = self._config_updates(out_layer, layer_types if reference_types else None)
        dtypes = sorted({str(dtype).removeprefix("torch.") for dtype in self.plan.working_dtype.values()})
        if len(dtypes) > 1:  # each slice would keep its source's dtype: one model in several dtypes
            raise MergeError(f"the slices' sources are stored in {' and '.join(dtypes)}; set dtype: (e.g. "
                             f"{dtypes[0]}) in the config so the stacked model has one dtype")
        return self.plan

    def _add_layer(self, index: int, output_slice: OutputSlice, offset: int, out_layer: int, t: float) -> None:
        where = f"slices[{index}]"
        layers = []
        for source in output_slice.sources:
            layer = self.layouts[source.path].layers[source.layer_range[0] + offset]
            _check_layer(self.template, self.by_path[source.path], layer, where)
            layers.append(layer)
        for tail in sorted(self.template, key=lambda k: self.template[k].start):
            self.add(f"{self.layout.stack}{out_layer}{tail}", [layer[tail] for layer in layers], index, t)

    def _config_file(self) -> Path | None:
        base = self.config.base_model
        folder = base if base is not None and base.is_dir() else self.reference.folder
        return folder / "config.json" if folder is not None and (folder / "config.json").is_file() else None

    def _layer_types(self) -> list[Any] | None:
        """The output config's per-layer `layer_types`, when it has one entry per layer of the reference."""
        config_file = self._config_file()
        types = read_model_config(config_file).get("layer_types") if config_file else None
        return types if isinstance(types, list) and len(types) == len(self.layout.layers) else None

    def _config_updates(self, layers: int, layer_types: list[Any] | None) -> dict[str, Any]:
        config_file = self._config_file()
        present = read_model_config(config_file) if config_file else {}
        keys = [key for key in LAYER_COUNT_KEYS if key in present] or ["num_hidden_layers"]
        updates: dict[str, Any] = {key: layers for key in keys}
        if layer_types is not None:
            updates["layer_types"] = layer_types
        return updates


def plan_slices(config: MergeConfig, spec: MergeMethodSpec) -> SlicedPlan:
    """Open the sources' headers and route every output tensor of a `slices:` config; no tensor data is read."""
    by_path, checkpoints = _open(config)
    try:
        layouts = {path: layer_layout(checkpoint) for path, checkpoint in by_path.items()}
        _check_bounds(config, layouts, by_path)
        return _Planner(config, spec, by_path, layouts).run()
    except BaseException:
        for checkpoint in checkpoints:
            checkpoint.close()
        raise

"""Apply a merge method to whole checkpoints, one output tensor at a time.

`plan_merge` opens every checkpoint's headers and validates everything — names, shapes, dtypes, parameters,
weights, the output location — before any tensor data is read. `run_merge` then, for each output tensor in
file order, reads the base's and every model's tensor (`Checkpoint.read`, no mmap), hands them to the method
(which may reuse their buffers), writes the result straight into its output shard and drops it. Peak memory is
about (models + 1) tensors plus the method's temporaries, plus the next group being read in a background thread;
it does not grow with model size or model count × model size.

The output is a folder of safetensors shards + `model.safetensors.index.json` (when sharded) + the base's
`config.json` (dtype updated) and tokenizer files + `deltatune_merge.yml`, built in a hidden temporary sibling
folder and renamed into place only when complete (`deltatune.core.atomic.atomic_directory`): a failure — a
bad tensor, a full disk, Ctrl-C — leaves no partial output. Inputs are only ever read.

A `slices:` config is planned by `io/slices.py`: each output tensor gets a route (which source tensor of which
checkpoint feeds it, with its parameters) and config.json gets the new layer count; streaming is the same.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from deltatune.core.atomic import atomic_directory
from deltatune.errors import DeltatuneError, MergeError
from deltatune.merging.algebra.statistics import order_statistics
from deltatune.merging.config.parse import MergeConfig
from deltatune.merging.config.resolve import ParameterResolver
from deltatune.merging.io.checkpoint import (
    Checkpoint,
    OutputTensor,
    ShardWriter,
    plan_shards,
    shard_file_names,
    write_index,
)
from deltatune.merging.io.slices import TensorRoute, plan_slices
from deltatune.merging.io.validate import check_compatible, check_output_location, layer_count, read_model_config
from deltatune.merging.registry import MergeInputs, MergeMethodSpec, tensor_generators

DEFAULT_SHARD_BYTES = 5 * 1000**3
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
                "chat_template.jinja", "chat_template.json", "sentencepiece.bpe.model", "spiece.model")


@dataclass
class MergePlan:
    """Everything decided before reading tensor data."""

    config: MergeConfig
    spec: MergeMethodSpec
    base: Checkpoint | None
    models: list[Checkpoint]
    resolver: ParameterResolver
    outputs: list[OutputTensor]
    working_dtype: dict[str, torch.dtype] = field(default_factory=dict)
    # the `slices:` form: each output tensor's sources (renamed, regrouped) and the config.json keys it changes
    routes: dict[str, TensorRoute] = field(default_factory=dict)
    config_updates: dict[str, object] = field(default_factory=dict)

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    def all_inputs(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.models

    def close(self) -> None:
        for checkpoint in self.all_inputs():
            checkpoint.close()


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    tensors: int
    bytes_written: int
    shards: int
    seconds: float


def _open_inputs(config: MergeConfig, spec: MergeMethodSpec) -> tuple[Checkpoint | None, list[Checkpoint]]:
    if spec.base == "required" and config.base_model is None:
        raise MergeError(f"merge_method {spec.name} needs base_model: the model the fine-tunes started from")
    base = None
    if config.base_model is not None and spec.base != "unused":
        base = Checkpoint(config.base_model, "base_model")
    models = [Checkpoint(entry.path, f"models[{i}]") for i, entry in enumerate(config.models)]
    if len(models) < spec.min_models:
        raise MergeError(f"merge_method {spec.name} needs at least {spec.min_models} models, got {len(models)}")
    return base, models


def _without_base_entries(config: MergeConfig) -> MergeConfig:
    """A model listed under `models` that is the base itself only plays the base (mergekit does the same)."""
    if config.base_model is None or config.method.base == "unused":
        return config
    kept = tuple(entry for entry in config.models if entry.path != config.base_model)
    if not kept:
        raise MergeError("every entry of models: is the base_model; list at least one fine-tuned model")
    return dataclasses.replace(config, models=kept)


def _plan_sliced(config: MergeConfig, out_dir: Path | None, overwrite: bool) -> MergePlan:
    sliced = plan_slices(config, config.method)
    plan = MergePlan(config, config.method, None, sliced.checkpoints, ParameterResolver(config, None),
                     sliced.outputs, sliced.working_dtype, sliced.routes, sliced.config_updates)
    try:
        if out_dir is not None:
            check_output_location(Path(out_dir), plan.models, overwrite)
    except BaseException:
        plan.close()
        raise
    return plan


def plan_merge(config: MergeConfig, out_dir: Path | None = None, overwrite: bool = False) -> MergePlan:
    """Open headers and validate everything; no tensor data is read."""
    if config.slices:
        return _plan_sliced(config, out_dir, overwrite)
    config = _without_base_entries(config)
    spec = config.method
    base, models = _open_inputs(config, spec)
    reference = base if base is not None else models[0]
    for checkpoint in models if base is not None else models[1:]:
        check_compatible(reference, checkpoint, cast=config.dtype is not None)
    if out_dir is not None:
        check_output_location(Path(out_dir), ([base] if base else []) + models, overwrite)
    resolver = ParameterResolver(config, layer_count(reference))
    plan = MergePlan(config, spec, base, models, resolver, [])
    for name in reference.names_in_file_order():
        info = reference.tensors[name]
        if info.dtype.is_floating_point:
            resolver.resolve(name)  # validates every tensor's parameters up front
            plan.working_dtype[name] = config.dtype or info.dtype
            plan.outputs.append(OutputTensor(name, config.out_dtype or plan.working_dtype[name], info.shape))
        else:
            plan.outputs.append(OutputTensor(name, info.dtype, info.shape))
    return plan


def _load_route(plan: MergePlan, name: str, route: TensorRoute) -> MergeInputs:
    dtype = plan.working_dtype[name]
    base = route.base.checkpoint.read(route.base.name, dtype) if route.base is not None else None
    tensors = [source.checkpoint.read(source.name, dtype) for source in route.models]
    return MergeInputs(name, base, tensors, route.model_params, route.params,
                       generator=tensor_generators(plan.config.seed, name), owned=True)


def _load_group(plan: MergePlan, name: str) -> MergeInputs:
    if name in plan.routes:
        return _load_route(plan, name, plan.routes[name])
    dtype = plan.working_dtype[name]
    base = plan.base.read(name, dtype) if plan.base is not None else None
    tensors = [model.read(name, dtype) for model in plan.models]
    params, model_params = plan.resolver.resolve(name)
    return MergeInputs(name, base, tensors, model_params, params,
                       generator=tensor_generators(plan.config.seed, name), owned=True)


def _group_bytes(plan: MergePlan, name: str) -> int:
    route = plan.routes.get(name)
    info = route.inputs()[0].info if route is not None else plan.reference.tensors[name]
    count = len(route.inputs()) if route is not None else len(plan.all_inputs())
    itemsize = torch.empty((), dtype=plan.working_dtype[name]).element_size()
    return count * (info.nbytes // info.dtype.itemsize) * itemsize


def _groups(plan: MergePlan, names: list[str], prefetch: bool = True) -> Iterator[tuple[str, MergeInputs | None]]:
    """(name, inputs) in order. The next group is read in a background thread while this one is merged, unless
    holding both would exceed 1.25× the largest group (so prefetching never doubles the peak memory)."""
    floating = [n for n in names if n in plan.working_dtype]
    sizes = {n: _group_bytes(plan, n) for n in floating}
    budget = 1.25 * max(sizes.values(), default=0)
    position = {n: i for i, n in enumerate(floating)}
    pending: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        for name in names:
            if name not in position:
                yield name, None
                continue
            future = pending.pop(name, None)
            current = future.result() if future is not None else _load_group(plan, name)
            following = floating[position[name] + 1] if position[name] + 1 < len(floating) else None
            if prefetch and following is not None and sizes[name] + sizes[following] <= budget:
                pending[following] = pool.submit(_load_group, plan, following)
            yield name, current
            del current


def compute_statistics(plan: MergePlan) -> dict[str, list[tuple[float, ...]]]:
    """Run the method's whole-model statistics (extra read passes), if its parameters ask for any."""
    first = plan.outputs[0].name if plan.outputs else None
    if plan.spec.statistics is None or first is None or first not in plan.working_dtype or plan.routes:
        # (a slices: plan has refused parameters that need statistics, io/slices.py)
        return {}
    params, model_params = plan.resolver.resolve(first)
    requests = plan.spec.statistics(params, model_params)
    statistics: dict[str, list[tuple[float, ...]]] = {}
    names = [o.name for o in plan.outputs if o.name in plan.working_dtype]
    total = sum(plan.reference.tensors[n].nbytes // plan.reference.tensors[n].dtype.itemsize for n in names)
    for request in requests:
        def score_groups(request=request):
            for _, inputs in _groups(plan, names):
                yield request.score(inputs, statistics)
        ranks = [request.ranks(total, index) for index in range(len(plan.models))]
        statistics[request.key] = order_statistics(score_groups, ranks)
    return statistics


def _merge_one(plan: MergePlan, name: str, inputs: MergeInputs | None, statistics: dict, out: OutputTensor) -> Tensor:
    if inputs is None:  # integer / bool buffers are copied from the reference
        if name in plan.routes:
            source = plan.routes[name].inputs()[0]
            return source.checkpoint.read(source.name)
        return plan.reference.read(name)
    inputs.statistics = statistics
    result = plan.spec.merge(inputs)
    if result.shape != out.shape:
        raise MergeError(f"merge_method {plan.spec.name} returned shape {tuple(result.shape)} for {name!r}, "
                         f"expected {out.shape}")
    return result.to(out.dtype)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not enabled, leave=False)


def write_tensors(plan: MergePlan, folder: Path, shard_bytes: int, statistics: dict, progress: bool) -> list:
    shards = plan_shards(plan.outputs, shard_bytes)
    files = shard_file_names(len(shards))
    writers = [ShardWriter(folder / file, tensors) for file, tensors in zip(files, shards)]
    order = [tensor for writer in writers for tensor in writer.order]
    by_name = {tensor.name: tensor for tensor in order}
    bar = _progress(sum(t.nbytes for t in order), progress)
    try:
        current = 0
        for name, inputs in _groups(plan, [t.name for t in order]):
            while writers[current].expects() is None:
                writers[current].close()
                current += 1
            writers[current].write(name, _merge_one(plan, name, inputs, statistics, by_name[name]))
            del inputs  # release this group before the next one is taken from the reader
            bar.update(by_name[name].nbytes)
        for writer in writers[current:]:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        bar.close()
    return list(zip(files, shards))


def _output_dtype_name(plan: MergePlan) -> str | None:
    dtypes = {o.dtype for o in plan.outputs if o.dtype.is_floating_point}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def copy_side_files(plan: MergePlan, folder: Path) -> None:
    """config.json (dtype updated) and tokenizer files from the base (or first model) folder; the config used."""
    base = plan.config.base_model
    source = base if base is not None and base.is_dir() else plan.reference.folder
    if source is not None:
        config_file = source / "config.json"
        if config_file.is_file():
            config = read_model_config(config_file)
            dtype = _output_dtype_name(plan)
            for key in ("dtype", "torch_dtype"):
                if key in config and dtype is not None:
                    config[key] = dtype
            config.update(plan.config_updates)
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for file_name in COPIED_FILES:
            if (source / file_name).is_file():
                shutil.copyfile(source / file_name, folder / file_name)
    if plan.config.source_text:
        (folder / "deltatune_merge.yml").write_text(plan.config.source_text)


def merge_to_memory(config: MergeConfig) -> dict[str, Tensor]:
    """The merged tensors of `config` as one in-memory state dict (file order), without writing anything: what
    `run_merge` would write, for scoring many settings of one config (`deltatune merge --search`)."""
    plan = plan_merge(config)
    try:
        statistics = compute_statistics(plan)
        by_name = {output.name: output for output in plan.outputs}
        return {name: _merge_one(plan, name, inputs, statistics, by_name[name])
                for name, inputs in _groups(plan, list(by_name))}
    finally:
        plan.close()


def run_merge(config: MergeConfig, out_dir: str | os.PathLike, *, overwrite: bool = False,
              shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
              side_files: dict[str, str] | None = None) -> MergeReport:
    """Merge the checkpoints of `config` into `out_dir`, atomically (see the module docstring).

    side_files: {file name: text} written into the folder with it (e.g. a search's record), inside the same
    atomic swap, so the folder never holds a model without its record."""
    start = time.perf_counter()
    out = Path(out_dir)
    plan = plan_merge(config, out, overwrite)
    try:
        statistics = compute_statistics(plan)
        with atomic_directory(out) as staging:
            shards = write_tensors(plan, staging, shard_bytes, statistics, progress)
            if len(shards) > 1:
                write_index(staging, shards)
            copy_side_files(plan, staging)
            for file_name, text in (side_files or {}).items():
                (staging / file_name).write_text(text)
    except DeltatuneError:
        raise
    except OSError as error:
        raise MergeError(f"writing {out} failed: {error.strerror or error}; nothing was written — free disk "
                         "space or choose another output folder") from None
    finally:
        plan.close()
    written = sum(o.nbytes for o in plan.outputs)
    return MergeReport(out, len(plan.outputs), written, len(shards), time.perf_counter() - start)

"""LoRA extraction: a peft LoRA folder from a full fine-tune and its base, by truncated SVD of each layer's delta.

    ΔW = W_ft − W_base ≈ B A,   B = U_r diag(√σ),   A = diag(√σ) V_rᵀ,   lora_alpha = r (scale 1)

per Linear layer (`algebra.lowrank`: best rank-r approximation, Eckart–Young; error sqrt(Σ_{i>r} σ_i²)), with r
fixed (`rank`), or chosen per layer by singular-value energy (`energy`) or ratio (`sv_ratio`). This is
`mergekit-extract-lora` (0.1.5, `mergekit/scripts/extract_lora.py`) with adaptive ranks and an error report; its
choices are kept:

- the SVD is a full thin `torch.linalg.svd` in float32 on the CPU (`compute_dtype` may be float64;
  `solver="randomized"` is `torch.svd_lowrank` with 10 columns of oversampling and 2 power iterations, seeded per
  layer, for large layers at a small rank: an addition, not mergekit's); factors are
  stored in the fine-tune's dtype (`out_dtype` overrides);
- √σ on both factors (mergekit's default `--distribute-scale`; `split="left"` is `--no-distribute-scale`);
- a fixed rank is capped per layer at min(out, in);
- **embeddings** (nn.Embedding, the input and output embeddings) are saved whole from the fine-tune into
  `modules_to_save` (mergekit's default; `embeddings="lora"` is its `--embed-lora`: nn.Embedding as
  ``lora_embedding_A/B`` of ΔEᵀ, the output head as a Linear);
- **other modules with weights** (norms, HF Conv1D, convolutions) are saved whole from the fine-tune into
  `modules_to_save` (mergekit: "unsupported module type - saving at full rank"); `others="skip"` is its
  `--skip-undecomposable`;
- **Linear biases**: the bias delta is written as ``lora_B.bias``. Deviation: mergekit writes the same tensor but
  leaves `lora_bias` false in the config, so peft drops it on load; here `lora_bias` is true when any is written
  (zeros for targeted layers without a bias).

Module kinds come from a meta-device instance of the model class named in the fine-tune's config.json (mergekit
does the same), except for the decoder families in `NAME_RULE_FAMILIES`, whose layout the name rules below
describe exactly (embed_tokens, lm_head, nn.Linear projections, 1-D norms), so transformers is not imported for
them. Without a config (or without transformers) the name rules decide: a 2-D ``*.weight`` is a Linear unless
its module name says embedding (``embed``, ``wte``, ``wpe``; ``lm_head`` is the output head), and other float
tensors are "others".
Layers whose ΔW is exactly zero get no LoRA (reported with rank 0); integer buffers are left out.

Streaming: headers are read first and everything is checked before any tensor data (missing tensors and shape
mismatches refused by name); then one layer at a time is read, decomposed and spooled (`io.lora_folder`), so
peak memory is a few copies of the largest tensor. The folder is built in a hidden sibling and renamed into place
(`core.atomic.atomic_directory`); an existing folder is replaced only with `overwrite` and only if this tool
wrote it.
"""
from __future__ import annotations

import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltatune.core.atomic import atomic_directory
from deltatune.errors import ConfigError, MergeError, config_check
from deltatune.merging.algebra.lowrank import SOLVERS, SPLITS, LayerFit, RankRule, truncated_factors
from deltatune.merging.io.checkpoint import Checkpoint
from deltatune.merging.io.lora_folder import (
    LAYOUTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PREFIX,
    REPORT_NAME,
    TOOL_FIELD,
    SpooledTensors,
    check_replaceable,
    pad_rank,
    peft_lora_config,
    print_table,
    totals_of,
    write_json,
)
from deltatune.merging.io.modules import EMBEDDING, HEAD, OTHER, Module, plan_modules, targeted
from deltatune.merging.io.validate import check_output_location, read_model_config

TOOL = "deltatune extract-lora"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ExtractOptions:
    """What `extract_lora` does besides the rank rule (defaults: mergekit-extract-lora's)."""

    targets: tuple[str, ...] | str | None = None
    embeddings: str = "save"
    others: str = "save"
    layout: str = "padded"
    split: str = "sqrt"
    compute_dtype: str = "float32"
    solver: str = "full"
    seed: int = 0
    out_dtype: str | None = None

    def __post_init__(self) -> None:
        config_check(self.embeddings in ("save", "lora"), "embeddings", self.embeddings, "'save' or 'lora'")
        config_check(self.others in ("save", "skip"), "others", self.others, "'save' or 'skip'")
        config_check(self.layout in LAYOUTS, "layout", self.layout, f"one of {LAYOUTS}")
        config_check(self.split in SPLITS, "split", self.split, f"one of {SPLITS}")
        config_check(self.solver in SOLVERS, "solver", self.solver, f"one of {SOLVERS}")
        config_check(self.compute_dtype in ("float32", "float64"), "compute_dtype", self.compute_dtype,
                     "'float32' or 'float64'")
        config_check(self.out_dtype is None or self.out_dtype in DTYPES, "out_dtype", self.out_dtype,
                     f"None or one of {sorted(DTYPES)}")
        if isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as error:
                raise ConfigError(f"targets={self.targets!r} is not a valid regular expression: {error}") from None


@dataclass
class ExtractReport:
    """What was written: the per-layer rows (name, shape, rank, relative error, ...) and the totals."""

    out_dir: Path
    layers: list[dict[str, Any]]
    saved_whole: list[str]
    skipped: list[str]
    totals: dict[str, Any]
    seconds: float

    def print(self, stream: Any = None) -> None:
        print_table(self.layers, self.totals, stream)


def _role(module: Module, options: ExtractOptions) -> str:
    """'lora', 'save' (whole, into modules_to_save) or 'skip' for one module."""
    if module.kind in (EMBEDDING, HEAD) and options.embeddings == "save":
        return "save"
    if module.kind == OTHER or module.weight is None:
        return "save" if options.others == "save" else "skip"
    return "lora" if targeted(module.path, options.targets) else "skip"


def _check_inputs(base: Checkpoint, finetuned: Checkpoint, roles: dict[str, tuple[Module, str]]) -> None:
    """Every tensor a LoRA is computed from exists in both with one shape; the fine-tune has all of the base's."""
    missing = [name for name in base.tensors if name not in finetuned.tensors]
    if missing:
        raise MergeError(f"finetuned {finetuned.path} lacks tensor {missing[0]!r} of base {base.path} (and "
                         f"{len(missing) - 1} more); pass the fine-tune of this base, saved completely")
    for module, role in roles.values():
        if role != "lora":
            continue
        for name in (module.weight, module.bias):
            if name is None:
                continue
            if name not in base.tensors:
                raise MergeError(f"base {base.path} has no tensor {name!r}, which finetuned {finetuned.path} has; "
                                 "pass the base this model was fine-tuned from")
            if base.tensors[name].shape != finetuned.tensors[name].shape:
                raise MergeError(f"tensor {name!r} has shape {finetuned.tensors[name].shape} in the fine-tune but "
                                 f"{base.tensors[name].shape} in the base; extraction needs equal shapes (exclude "
                                 "the module with targets=, or save it whole)")


def _delta(base: Checkpoint, finetuned: Checkpoint, name: str, dtype: torch.dtype) -> Tensor:
    return finetuned.read(name, dtype) - base.read(name, dtype)


def _fit_layer(base: Checkpoint, finetuned: Checkpoint, module: Module, rule: RankRule,
               options: ExtractOptions) -> tuple[LayerFit, bool]:
    """The truncated factors of one layer (transposed for an embedding table: ΔEᵀ = B A, peft's layout)."""
    compute = DTYPES[options.compute_dtype]
    delta = _delta(base, finetuned, module.weight, compute)
    transposed = module.kind == EMBEDDING
    seed = zlib.crc32(module.path.encode()) ^ options.seed  # per layer: independent of the processing order
    return truncated_factors(delta.T if transposed else delta, rule, compute_dtype=compute, split=options.split,
                             solver=options.solver, seed=seed), transposed


def _lora_keys(path: str, transposed: bool) -> tuple[str, str]:
    if transposed:
        return f"{PREFIX}{path}.lora_embedding_A", f"{PREFIX}{path}.lora_embedding_B"
    return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def _row(module: Module, fit: LayerFit, shape: tuple[int, ...]) -> dict[str, Any]:
    return {"name": module.path, "shape": list(shape), "rank": fit.rank, "full_rank": fit.full_rank,
            "relative_error": fit.relative_error, "energy_kept": fit.energy_kept, "norm": fit.norm,
            "error": fit.error, "parameters": fit.rank * (shape[0] + shape[1])}


@dataclass
class _Run:
    base: Checkpoint
    finetuned: Checkpoint
    rule: RankRule
    options: ExtractOptions
    spool: SpooledTensors
    rows: list[dict[str, Any]] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    transposed: dict[str, bool] = field(default_factory=dict)
    biases: dict[str, str] = field(default_factory=dict)  # module path -> spooled lora_B.bias key
    saved: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def out_dtype(self, name: str) -> torch.dtype:
        given = self.options.out_dtype
        return DTYPES[given] if given else self.finetuned.tensors[name].dtype

    def extract(self, module: Module) -> None:
        fit, transposed = _fit_layer(self.base, self.finetuned, module, self.rule, self.options)
        self.rows.append(_row(module, fit, self.finetuned.tensors[module.weight].shape))
        if fit.rank == 0:  # ΔW = 0: nothing to add
            return
        dtype = self.out_dtype(module.weight)
        key_a, key_b = _lora_keys(module.path, transposed)
        self.spool.add(key_a, fit.down.to(dtype).contiguous())
        self.spool.add(key_b, fit.up.to(dtype).contiguous())
        self.ranks[module.path], self.transposed[module.path] = fit.rank, transposed
        if module.bias is not None:
            key = f"{PREFIX}{module.path}.lora_B.bias"
            bias = _delta(self.base, self.finetuned, module.bias, DTYPES[self.options.compute_dtype])
            self.spool.add(key, bias.to(self.out_dtype(module.bias)))
            self.biases[module.path] = key

    def save_whole(self, module: Module) -> None:
        for name in (module.weight, module.bias):
            if name is not None:
                self.spool.add(PREFIX + name, self.finetuned.read(name, self.out_dtype(name)
                                                                   if self.options.out_dtype else None))
        self.saved.append(module.path)


def extract_lora(base: str | Path, finetuned: str | Path, out_dir: str | Path, *, rank: int | None = None,
                 energy: float | None = None, sv_ratio: float | None = None, max_rank: int | None = None,
                 targets: Sequence[str] | str | None = None, embeddings: str = "save", others: str = "save",
                 layout: str = "padded", split: str = "sqrt", compute_dtype: str = "float32",
                 out_dtype: str | None = None, solver: str = "full", seed: int = 0,
                 overwrite: bool = False) -> ExtractReport:
    """Extract a LoRA from `finetuned` − `base` into the peft folder `out_dir` (see the module docstring).

    Args:
        base, finetuned: safetensors model folders (sharded or not) or single files, same architecture.
        rank / energy / sv_ratio: the rank rule (exactly one; `algebra.lowrank.RankRule`); `max_rank` caps the
            adaptive rules.
        targets: which Linear layers get a LoRA (module names matched as a path suffix, or one full-match regex);
            None = every Linear, as mergekit. Untargeted Linear layers are left out.
        embeddings: "save" (whole, mergekit's default) or "lora" (mergekit's --embed-lora).
        others: "save" (norms etc. whole, mergekit's default) or "skip" (mergekit's --skip-undecomposable).
        layout: "padded" (one rank for all layers, zero-padded) or "pattern" (each layer at its own rank with
            peft's rank_pattern / alpha_pattern, as mergekit; smaller); both load in peft and in deltatune.
        split: "sqrt" (√σ on A and B, mergekit's default) or "left" (σ on A).
        compute_dtype: "float32" (mergekit's) or "float64" for the SVD; out_dtype: the stored dtype (default:
            the fine-tune's).
        solver: "full" (exact thin SVD, mergekit's) or "randomized" (`algebra.lowrank`; needs rank or max_rank),
            seeded by `seed` and the layer name.
        overwrite: replace an existing `out_dir` this tool wrote (never a folder it did not write).
    """
    started = time.perf_counter()
    rule = RankRule(rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank)
    if targets is not None and not isinstance(targets, str):
        targets = tuple(targets)
    options = ExtractOptions(targets=targets, embeddings=embeddings, others=others, layout=layout, split=split,
                             compute_dtype=compute_dtype, out_dtype=out_dtype, solver=solver, seed=seed)
    if solver == "randomized" and rank is None and max_rank is None:
        raise ConfigError("solver='randomized' needs rank= or max_rank= (it computes only the top singular "
                          "directions); pass one, or use solver='full'")
    base_ckpt, ft_ckpt = Checkpoint(base, "base"), Checkpoint(finetuned, "finetuned")
    out = Path(out_dir)
    check_output_location(out, [base_ckpt, ft_ckpt], overwrite=True)
    check_replaceable(out, overwrite, TOOL)
    roles = {m.path: (m, _role(m, options)) for m in plan_modules(ft_ckpt)}
    if not any(role == "lora" for _, role in roles.values()):
        raise ConfigError(f"no Linear layer of {ft_ckpt.path} is targeted (targets={options.targets!r}); "
                          "check the module names")
    _check_inputs(base_ckpt, ft_ckpt, roles)
    try:
        with atomic_directory(out) as staging:
            run = _Run(base_ckpt, ft_ckpt, rule, options, SpooledTensors(staging / ".spool"))
            for module, role in roles.values():
                if role == "lora":
                    run.extract(module)
                elif role == "save":
                    run.save_whole(module)
                else:
                    run.skipped.append(module.path)
            report = _finish(run, staging, out, started)
    finally:
        base_ckpt.close()
        ft_ckpt.close()
    return report


def _finish(run: _Run, staging: Path, out: Path, started: float) -> ExtractReport:
    if not run.ranks:
        raise MergeError("every targeted layer has ΔW = 0: the fine-tune equals the base there, nothing to extract")
    top = max(run.ranks.values())
    if run.options.layout == "padded":
        _check_padding(run, top)
    shapes, reshape = _padding(run, top)
    stored = write_adapter(run.spool, staging, run.ranks, run.saved, run.options.layout, shapes, reshape,
                           bias=bool(run.biases), base_model=str(run.base.path), task_type=_task_type(run.finetuned))
    totals = totals_of(run.rows) | {"stored_bytes": stored, "layout": run.options.layout}
    report = ExtractReport(out, run.rows, run.saved, run.skipped, totals, time.perf_counter() - started)
    write_json(staging / REPORT_NAME, {
        TOOL_FIELD: TOOL, "base": str(run.base.path), "finetuned": str(run.finetuned.path),
        "rule": asdict(run.rule), "options": asdict(run.options), "layers": run.rows, "saved_whole": run.saved,
        "skipped": run.skipped, "totals": totals, "seconds": report.seconds})
    return report


def _check_padding(run: _Run, top: int) -> None:
    for row in run.rows:
        if row["rank"] and top > row["full_rank"]:
            raise ConfigError(f"layout='padded' stores every layer at rank {top}, above the full rank "
                              f"{row['full_rank']} of {row['name']!r}; use layout='pattern' or max_rank <= "
                              f"{row['full_rank']}")


def _padding(run: _Run, top: int) -> tuple[dict[str, tuple[int, ...]], Any]:
    """Final shapes and the reshape that zero-pads A's rows / B's columns to `top` (padded layout only)."""
    if run.options.layout != "padded":
        return {}, None
    axes: dict[str, int] = {}
    for path, transposed in run.transposed.items():
        key_a, key_b = _lora_keys(path, transposed)
        axes[key_a], axes[key_b] = 0, 1
    shapes = {}
    for key, axis in axes.items():
        shape = list(run.spool.shape(key))
        shape[axis] = top
        shapes[key] = tuple(shape)
    return shapes, lambda name, tensor: pad_rank(tensor, top, axes[name]) if name in axes else tensor


def write_adapter(spool: SpooledTensors, staging: Path, ranks: dict[str, int], saved: list[str], layout: str,
                  shapes: dict[str, tuple[int, ...]], reshape: Any, *, bias: bool, base_model: str | None,
                  task_type: str | None) -> int:
    """adapter_model.safetensors (from the spool) and adapter_config.json into `staging`; the weights' size."""
    if bias:  # peft's lora_bias adds a bias to every targeted layer: zeros where the base layer has none
        for path in ranks:
            key, weight = f"{PREFIX}{path}.lora_B.bias", f"{PREFIX}{path}.lora_B.weight"
            if key not in spool.names() and weight in spool.names():
                spool.add(key, torch.zeros(spool.shape(weight)[0], dtype=spool.dtype(weight)))
    stored = spool.finish(staging / PEFT_WEIGHTS, reshape, shapes)
    config = peft_lora_config(ranks if layout == "pattern" else dict.fromkeys(ranks, max(ranks.values())), layout,
                              saved, bias=bias, base_model=base_model, task_type=task_type)
    write_json(staging / PEFT_CONFIG, config)
    return stored


def _task_type(checkpoint: Checkpoint) -> str | None:
    config_file = checkpoint.folder / "config.json" if checkpoint.folder else None
    if config_file is None or not config_file.is_file():
        return None
    architectures = read_model_config(config_file).get("architectures") or [""]
    return "CAUSAL_LM" if str(architectures[0]).endswith("ForCausalLM") else None

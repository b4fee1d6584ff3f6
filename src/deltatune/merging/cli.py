"""`deltatune merge | prune | extract-lora | resize-lora`: the command-line face of `deltatune.merging`.

The main CLI (`deltatune.cli`) calls `add_merge_commands(subparsers)`; each command's `func(args) -> int`
raises DeltatuneError subclasses, which the main CLI prints as one line.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from deltatune.errors import ConfigError

MERGE_EPILOG = """example config (mergekit's models: syntax; see src/deltatune/merging/README.md):
  merge_method: ties
  base_model: ./base
  models:
    - model: ./math
      parameters: {weight: 1.0, density: 0.2}
    - model: ./code
      parameters: {weight: 1.0, density: 0.2}
  parameters: {lambda: 1.0}

examples:
  deltatune merge ties.yaml --out merged/
  deltatune merge ties.yaml --out merged/ --overwrite --shard-size 2GB
  deltatune merge stack.yaml --out stacked/      # passthrough with slices: (layer stacking, see the README)
  deltatune merge --list-methods

choosing settings on validation data (--search; see src/deltatune/merging/README.md):
  # in the YAML, a range stands where a number would:  parameters: {density: {search: [0.1, 0.9]}}
  deltatune merge ties.yaml --search --eval glyphs-novel-vit --budget 16 --out merged/
  # or the ranges on the command line (CONFIG first):
  deltatune merge ties.yaml --search lambda=0.2:2.0 density=0.1:0.9 --budget 16 --out merged/ \\
      --eval wordnet-nouns,prefix=backbone.,head=nouns.head.safetensors,size=300 \\
      --eval wordnet-verbs:loss,prefix=backbone.,head=verbs.head.safetensors
  --eval TASK[:METRIC][,option=value...]: a built-in task's validation split (never test). METRIC: the task's
      own (accuracy; default), loss (labelled), entropy or output_change (unlabelled; output_change needs
      reference=CHECKPOINT, DAREx-q's objective). Options: size=N, prefix=P (module path of the merged tensors in
      the task's model), head=PATH (the task's own head), reference=PATH, max_length=N. Several --eval: the
      mean of their scores. --budget N: exactly N merges evaluated (CMA-ES; one dimension: N evenly spaced
      points; --strategy grid: k^d <= N points). Writes the merge at the best setting, with merge_search.json
      and merge_search.md (every evaluation) in the output folder.
"""
PRUNE_EPILOG = """examples:
  deltatune prune ./finetuned --base ./base --out pruned/ --drop-rate 0.9             # DARE
  deltatune prune ./finetuned --base ./base --out pruned/ --method darex --drop-rate 0.99 --q 0.2
  deltatune prune ./finetuned --base ./base --out pruned/ --method darex --drop-rate 0.99 --q-map q.json
  deltatune prune ./finetuned --base ./base --out pruned/ --method magnitude --drop-rate 0.9
"""
EXTRACT_EPILOG = """examples:
  deltatune extract-lora ./base ./finetuned lora/ --rank 16               # mergekit-extract-lora --max-rank 16
  deltatune extract-lora ./base ./finetuned lora/ --energy 0.9 --max-rank 64
  deltatune extract-lora ./base ./finetuned lora/ --sv-ratio 20 --layout pattern --targets q_proj v_proj
  deltatune resize-lora lora/ lora-r4/ --rank 4
  deltatune resize-lora lora/ lora-adaptive/ --energy 0.95 --layout pattern

Embeddings and the output head are saved whole (modules_to_save) unless --embed-lora; norms and other
non-Linear modules are saved whole unless --skip-undecomposable (mergekit's defaults and flags).
--layout padded (default) stores one rank for all layers (peft and deltatune load it); --layout pattern stores
each layer at its own rank with peft's rank_pattern (smaller; peft and deltatune load it too).
"""
PRUNE_METHODS = {"dare": "dare_linear", "darex": "darex", "magnitude": "magnitude_prune"}
UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1e9' or a byte count -> bytes (decimal units, as mergekit's --out-shard-size)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]I?)?B?\s*", text.upper())
    if match is None:
        raise ConfigError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or a number of bytes")
    try:
        value = float(match.group(1)) * UNITS[match.group(2) or ""]
    except ValueError:
        raise ConfigError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or a number of bytes") from None
    if value < 1:
        raise ConfigError(f"--shard-size {text!r}: expected at least 1 byte")
    return int(value)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        if threads < 1:
            raise ConfigError(f"--threads {threads}: expected an integer >= 1")
        torch.set_num_threads(threads)


def _report(report) -> None:
    size = report.bytes_written / 1e9
    print(f"merged {report.tensors} tensors ({size:.2f} GB in {report.shards} shard"
          f"{'s' if report.shards > 1 else ''}) into {report.out_dir} in {report.seconds:.1f} s")


def cmd_merge(args: argparse.Namespace) -> int:
    from deltatune.merging.registry import list_merge_methods

    if args.list_methods:
        for spec in list_merge_methods():
            print(f"{spec.name:<17} base {spec.base:<9} {spec.description}")
        return 0
    if args.config is None or args.out is None:
        raise ConfigError("deltatune merge needs CONFIG.yaml and --out DIR (or --list-methods)")
    from dataclasses import replace

    from deltatune.merging.config.parse import load_config
    from deltatune.merging.io.stream import run_merge

    _set_threads(args.threads)
    if args.search is not None:
        return _search_merge(args)
    if args.eval or args.budget is not None:
        raise ConfigError("--eval and --budget belong to a search: add --search (and search blocks or NAME=LOW:HIGH)")
    config = load_config(args.config)
    if args.seed is not None:
        config = replace(config, seed=args.seed)
    report = run_merge(config, args.out, overwrite=args.overwrite, shard_bytes=parse_size(args.shard_size),
                       progress=not args.no_progress)
    _report(report)
    return 0


def _print_evaluation(budget: int):
    def report(evaluation) -> None:
        setting = " ".join(f"{name}={value:.4g}" for name, value in evaluation.setting.items())
        parts = ", ".join(f"{name} {value:.4g}" for name, value in evaluation.parts.items())
        print(f"evaluation {evaluation.index}/{budget}: {setting} -> score {evaluation.score:.5g} ({parts}) "
              f"in {evaluation.seconds:.1f} s", flush=True)
    return report


def _search_merge(args: argparse.Namespace) -> int:
    """`merge --search`: parse, check everything before the first merge, search, write the best merge + record."""
    from deltatune.merging.config.parse import read_config_yaml
    from deltatune.merging.search.config_search import check_searchable, search_merge_config, write_best
    from deltatune.merging.search.objectives import evaluation_objective
    from deltatune.merging.search.space import add_search_options

    if args.budget is None:
        raise ConfigError("--search needs --budget N: the number of merges evaluated (e.g. --budget 16)")
    raw, _, folder = read_config_yaml(args.config)
    if not isinstance(raw, dict):
        raise ConfigError("the merge config must be a YAML mapping with merge_method, models, ...")
    raw = add_search_options(raw, args.search)
    if args.seed is not None:
        raw["seed"] = args.seed
    check_searchable(raw, folder, args.out, args.overwrite)  # before spending the budget
    objective = evaluation_objective(args.eval or [])
    record = search_merge_config(raw, objective, budget=args.budget, seed=args.search_seed,
                                 strategy=args.strategy, config_dir=folder, report=_print_evaluation(args.budget))
    best = record.best
    print(f"best of {len(record.evaluations)} evaluations: #{best.index} "
          + " ".join(f"{k}={v:.6g}" for k, v in best.setting.items()) + f", score {best.score:.6g}")
    _report(write_best(raw, record, args.out, config_dir=folder, overwrite=args.overwrite,
                       shard_bytes=parse_size(args.shard_size), progress=not args.no_progress))
    return 0


def _density_setting(density: float, keep: list[str]) -> list[dict]:
    return [{"filter": pattern, "value": 1.0} for pattern in keep] + [{"value": density}]


def _conditions(setting: object) -> list[dict]:
    return setting if isinstance(setting, list) else [{"value": setting}]


def _q_setting(args: argparse.Namespace) -> object:
    if args.q_map is None:
        return args.q
    try:
        q_map = yaml.safe_load(Path(args.q_map).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--q-map {args.q_map}: cannot read it as JSON/YAML ({error}); write "
                          "{tensor name: q, ...}") from None
    if not isinstance(q_map, dict):
        raise ConfigError(f"--q-map {args.q_map}: expected a mapping {{tensor name: q}}")
    # longest names first: a full tensor name can then only match itself (filters match substrings)
    conditions = [{"filter": name, "value": q_map[name]} for name in sorted(q_map, key=len, reverse=True)]
    return conditions + ([{"value": args.q}] if args.q is not None else [])


def prune_config_dict(args: argparse.Namespace) -> dict:
    """The merge config a prune command stands for: one model, weight 1, the chosen method's density / q."""
    if not 0.0 <= args.drop_rate < 1.0:
        raise ConfigError(f"--drop-rate {args.drop_rate}: expected 0 <= p < 1 (the fraction of delta entries dropped)")
    method = PRUNE_METHODS[args.method]
    keep = args.keep if args.keep is not None else ["classifier", "lm_head"]
    model_parameters: dict = {"weight": 1.0, "density": _density_setting(1.0 - args.drop_rate, keep)}
    parameters: dict = {}
    if args.method == "darex":
        q = _q_setting(args)
        if q is not None:  # kept tensors are left whole: no drop and no rescale, as the official code's heads
            model_parameters["q"] = [{"filter": pattern, "value": 1.0} for pattern in keep] + _conditions(q)
    elif args.q is not None or args.q_map is not None:
        raise ConfigError("--q and --q-map only apply to --method darex")
    if args.method == "dare":
        parameters["rescale"] = args.rescale
    raw = {"merge_method": method, "base_model": str(args.base), "semantics": "paper", "seed": args.seed,
           "models": [{"model": str(args.finetuned), "parameters": model_parameters}], "parameters": parameters}
    if args.dtype:
        raw["dtype"] = args.dtype
    return raw


def cmd_prune(args: argparse.Namespace) -> int:
    from deltatune.merging.config.parse import config_from_dict
    from deltatune.merging.io.stream import run_merge

    _set_threads(args.threads)
    raw = prune_config_dict(args)
    config = config_from_dict(raw, None, yaml.safe_dump(raw, sort_keys=False))
    report = run_merge(config, args.out, overwrite=args.overwrite, shard_bytes=parse_size(args.shard_size),
                       progress=not args.no_progress)
    _report(report)
    return 0


def _rank_rule(args: argparse.Namespace) -> dict:
    return {"rank": args.rank, "energy": args.energy, "sv_ratio": args.sv_ratio, "max_rank": args.max_rank}


def _print_report(report, quiet: bool) -> None:
    if not quiet:
        report.print()
    print(f"wrote {report.out_dir} ({report.totals['layers']} layers, {report.totals['parameters']:,} LoRA "
          f"parameters, relative error {report.totals['relative_error']:.4g}) in {report.seconds:.1f} s")


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from deltatune.merging.extract import extract_lora

    _set_threads(args.threads)
    targets = args.targets[0] if args.targets and len(args.targets) == 1 and args.regex else args.targets
    report = extract_lora(args.base, args.finetuned, args.out, **_rank_rule(args), targets=targets,
                          embeddings="lora" if args.embed_lora else "save",
                          others="skip" if args.skip_undecomposable else "save", layout=args.layout,
                          split="left" if args.no_distribute_scale else "sqrt", compute_dtype=args.compute_dtype,
                          out_dtype=args.dtype, solver=args.solver, seed=args.seed, overwrite=args.overwrite)
    _print_report(report, args.quiet)
    return 0


def cmd_resize_lora(args: argparse.Namespace) -> int:
    from deltatune.merging.resize import resize_lora

    _set_threads(args.threads)
    report = resize_lora(args.adapter, args.out, **_rank_rule(args), layout=args.layout,
                         compute_dtype=args.compute_dtype, overwrite=args.overwrite)
    _print_report(report, args.quiet)
    return 0


def _add_rank_options(parser: argparse.ArgumentParser, compute_default: str) -> None:
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=int, help="fixed rank r for every layer (capped at min(out, in))")
    rule.add_argument("--energy", type=float,
                      help="per layer, the smallest r keeping this fraction of sum(sigma^2) (e.g. 0.9)")
    rule.add_argument("--sv-ratio", type=float, help="per layer, keep sigma_i >= sigma_1 / SV_RATIO (kohya's rule)")
    parser.add_argument("--max-rank", type=int, default=None, help="cap of the adaptive rules' rank")
    parser.add_argument("--layout", choices=("padded", "pattern"), default="padded",
                        help="padded: one rank, zero-padded; pattern: per-layer ranks, peft's rank_pattern (both load "
                             "in peft and deltatune)")
    parser.add_argument("--compute-dtype", choices=("float32", "float64"), default=compute_default,
                        help=f"dtype of the SVD (default {compute_default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder this command wrote (never another tool's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the SVDs")
    parser.add_argument("--quiet", action="store_true", help="do not print the per-layer table")


def add_lora_commands(subparsers) -> None:
    """Register `extract-lora` and `resize-lora` on the main CLI's subparsers."""
    extract = subparsers.add_parser(
        "extract-lora", help="extract a LoRA from a full fine-tune and its base (truncated SVD per layer)",
        description="Per Linear layer, truncated SVD of W_ft - W_base into a peft LoRA folder (B = U sqrt(S), "
                    "A = sqrt(S) V^T, lora_alpha = r), streaming one tensor at a time, with a per-layer report "
                    "(rank, relative Frobenius error) printed and saved as lora_report.json.",
        epilog=EXTRACT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    extract.add_argument("base", help="base model folder (safetensors) or .safetensors file")
    extract.add_argument("finetuned", help="the fine-tuned model, same architecture")
    extract.add_argument("out", help="output folder (peft LoRA: adapter_config.json + adapter_model.safetensors)")
    _add_rank_options(extract, "float32")
    extract.add_argument("--targets", nargs="+", default=None, metavar="NAME",
                         help="only these Linear modules (path suffixes, e.g. q_proj v_proj; default: all)")
    extract.add_argument("--regex", action="store_true", help="--targets is one full-match regular expression")
    extract.add_argument("--embed-lora", action="store_true", help="LoRA for embeddings too (default: saved whole)")
    extract.add_argument("--skip-undecomposable", action="store_true",
                         help="leave out norms and other non-Linear modules (default: saved whole)")
    extract.add_argument("--no-distribute-scale", action="store_true",
                         help="A = S V^T, B = U instead of sqrt(S) on both (mergekit's flag)")
    extract.add_argument("--dtype", default=None, help="stored dtype (default: the fine-tune's)")
    extract.add_argument("--solver", choices=("full", "randomized"), default="full",
                         help="full thin SVD (exact, mergekit's) or randomized (svd_lowrank, oversampling 10, 2 power "
                              "iterations; needs --rank or --max-rank)")
    extract.add_argument("--seed", type=int, default=0, help="seed of the randomized solver (default 0)")
    extract.set_defaults(func=cmd_extract_lora)

    resize = subparsers.add_parser(
        "resize-lora", help="resize a peft LoRA to a smaller or adaptive rank (exact QR + small SVD)",
        description="Re-rank each layer of a peft LoRA folder from the SVD of its r x r core (QR of A and B; "
                    "the dense delta is never formed), by the same rules as extract-lora.",
        epilog=EXTRACT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    resize.add_argument("adapter", help="peft LoRA folder")
    resize.add_argument("out", help="output folder")
    _add_rank_options(resize, "float64")
    resize.set_defaults(func=cmd_resize_lora)


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    parser.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB; e.g. 500MB)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the tensor math")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_merge_commands(subparsers) -> None:
    """Register `merge` and `prune` on the main CLI's subparsers."""
    merge = subparsers.add_parser(
        "merge", help="merge fine-tuned checkpoints from a YAML config (mergekit-style)",
        description="Merge safetensors checkpoints (task_arithmetic, ties, dare_linear, dare_ties, darex, pcb, "
                    "linear, magnitude_prune) tensor by tensor, with bounded memory, into a new folder written "
                    "atomically. Inputs are never modified.",
        epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("config", nargs="?", help="merge YAML (mergekit's models: syntax)")
    merge.add_argument("--out", help="output folder (sharded safetensors + config.json + tokenizer files)")
    merge.add_argument("--seed", type=int, default=None, help="seed of the random methods (overrides the YAML)")
    merge.add_argument("--list-methods", action="store_true", help="list the merge methods and exit")
    search = merge.add_argument_group("choosing settings (--search)")
    search.add_argument("--search", nargs="*", default=None, metavar="NAME=LOW:HIGH",
                        help="search the config's {search: [low, high]} blocks and these ranges (NAME: a top-level "
                             "parameter such as lambda or density, or models[I].NAME) on --eval, within --budget")
    search.add_argument("--eval", action="append", default=None, metavar="TASK[:METRIC][,opt=val]",
                        help="validation objective (repeatable: the mean score); see the notes below")
    search.add_argument("--budget", type=int, default=None, help="number of merges evaluated (exactly, for cmaes)")
    search.add_argument("--strategy", choices=("cmaes", "grid"), default="cmaes",
                        help="cmaes (default; one dimension: an even sweep) or grid (k^d <= budget points)")
    search.add_argument("--search-seed", type=int, default=0, help="seed of the CMA-ES draws (default 0)")
    _add_output_options(merge)
    merge.set_defaults(func=cmd_merge)

    prune = subparsers.add_parser(
        "prune", help="prune one fine-tune's delta: DARE, DAREx-q or magnitude",
        description="Delta-parameter pruning of one fine-tuned checkpoint against its base: drop a fraction p of "
                    "θ_ft − θ_0 and rescale (DARE: 1/(1−p); DAREx-q: 1/q), or keep the largest entries "
                    "(magnitude). Writes base + pruned delta as a new checkpoint folder.",
        epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("finetuned", help="fine-tuned model folder or .safetensors file")
    prune.add_argument("--base", required=True, help="the base model it was fine-tuned from")
    prune.add_argument("--out", required=True, help="output folder")
    prune.add_argument("--method", choices=sorted(PRUNE_METHODS), default="dare", help="default: dare")
    prune.add_argument("--drop-rate", type=float, default=0.9, help="fraction p of delta entries dropped (0.9)")
    prune.add_argument("--rescale", choices=("inverse_density", "l1", "none"), default="inverse_density",
                       help="dare only: 1/(1-p) (paper), L1-norm matching (mergekit) or none (DropOnly)")
    prune.add_argument("--q", type=float, default=None, help="darex: rescale divisor q (default 1-p = DARE)")
    prune.add_argument("--q-map", default=None, help="darex: JSON/YAML {tensor name: q} for per-layer q")
    prune.add_argument("--keep", action="append", default=None, metavar="SUBSTRING",
                       help="tensors whose name contains this keep their whole delta (repeatable; default: "
                            "classifier, lm_head as in the DAREx code)")
    prune.add_argument("--seed", type=int, default=0, help="seed of the random drop (default 0)")
    prune.add_argument("--dtype", default=None, help="working dtype (float32, bfloat16, ...)")
    _add_output_options(prune)
    prune.set_defaults(func=cmd_prune)
    add_lora_commands(subparsers)

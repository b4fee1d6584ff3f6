"""`deltatune` command line: methods | train | compare | eval | inspect | demo | merge | prune.

Every error deltatune raises on purpose prints as one line (what was wrong, what was expected, the fix) and
exits with status 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """examples:
  deltatune methods
  deltatune train --method lora -p rank=8 -p alpha=16 --epochs 2 --out runs/lora
  deltatune train --method lora -p targets=query,key,value --task wordnet-verbs --out runs/verbs
  deltatune compare probe lora sara --seeds 0,1,2 --train-size 1000 --plot
  deltatune eval runs/lora/adapter --task wordnet-nouns
  deltatune inspect runs/lora/adapter
  deltatune demo
"""


def parse_method_params(method: str, pairs: Sequence[str]) -> dict[str, Any]:
    """`["rank=8", "targets=query,value"]` -> typed keyword arguments for the method's config (read by each
    field's type hint: `DeltaConfig.parse_field`)."""
    from deltatune.core.registry import method_entry
    from deltatune.errors import ConfigError

    config_cls = method_entry(method).config_cls
    fields = sorted(f.name for f in dataclasses.fields(config_cls))
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"-p {pair!r}: expected KEY=VALUE with KEY one of {fields}")
        try:
            params[key] = config_cls.parse_field(key, text)
        except ConfigError as error:
            raise ConfigError(f"-p {pair!r}: {error}") from None
    return params


def cmd_methods(args: argparse.Namespace) -> int:
    from deltatune.core.layers import KIND_LABELS
    from deltatune.core.registry import list_methods

    for entry in list_methods():
        layers = ", ".join(KIND_LABELS[k] for k in sorted(entry.delta_cls.layer_kinds))
        print(f"{entry.name:<14} {entry.description}")
        print(f"{'':<14} layers: {layers}; mergeable: {'yes' if entry.delta_cls.mergeable else 'no'}")
    print("\nreference points for `train --method`: probe (frozen backbone, head only), full (full fine-tuning)")
    return 0


def _method_params(args: argparse.Namespace) -> dict[str, Any]:
    from deltatune.recipe import FULL, PROBE

    if args.method in (PROBE, FULL):
        if args.param:
            from deltatune.errors import ConfigError

            raise ConfigError(f"-p {args.param[0]!r}: --method {args.method} has no hyper-parameters; drop -p, "
                              "or pick a registered method (see `deltatune methods`)")
        return {}
    return parse_method_params(args.method, args.param)


def cmd_train(args: argparse.Namespace) -> int:
    from deltatune.recipe import finetune

    try:
        result = finetune(
            args.task, args.method, _method_params(args), epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, max_length=args.max_length, train_size=args.train_size, seed=args.seed, out_dir=args.out,
            max_steps=args.max_steps, checkpoint_every=args.checkpoint_every, resume=args.resume,
            update_rule=args.update_rule, update_rule_options=_rule_options(args.rule_option),
            sharding=args.sharding,
        )
    except KeyboardInterrupt:
        print(f"deltatune: {_interrupted_training(Path(args.out))}", file=sys.stderr)
        return 130
    print(result.line())
    print(f"validation {result.metric} {result.validation_score:.4f}")
    if result.adapter_path:
        print(f"adapter saved to {result.adapter_path}")
    return 0


def _rule_options(pairs: list[str]) -> dict[str, object]:
    """`--rule-option KEY=VALUE` pairs as a dict, numbers as numbers (rho=0.1, ratio=16, base=loraplus)."""
    from deltatune.errors import ConfigError

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--rule-option {pair!r} is not KEY=VALUE; write e.g. --rule-option rho=0.1")
        options[key] = _number_or_text(value)
    return options


def _number_or_text(value: str) -> object:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def _interrupted_training(out: Path) -> str:
    """What an interrupted `train` leaves to resume from (checkpoints are written atomically: the last is whole)."""
    from deltatune.train.checkpoint import checkpoints_root, latest_checkpoint

    folder = latest_checkpoint(checkpoints_root(out))
    if folder is None:
        return (f"interrupted before the first checkpoint in {out}; nothing to resume (--checkpoint-every N "
                "checkpoints during training)")
    return f"interrupted; the last checkpoint {folder} is intact: run the same command with --resume to continue"


def cmd_eval(args: argparse.Namespace) -> int:
    import deltatune as dt
    from deltatune.data import load_task

    task = load_task(args.task, max_length=args.max_length)
    model = dt.load_adapter(task.build_model(), args.adapter, allow_nonfinite=args.allow_nonfinite)
    split = task.split(args.split)
    print(f"{args.split} {task.metric} {task.score(model, split):.4f} ({len(split)} examples, task {task.name})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from deltatune.errors import DeltatuneError
    from deltatune.inspect import summarize_adapter

    summary = summarize_adapter(args.adapter)
    if args.plot and not summary.ranks:
        raise DeltatuneError(f"{args.adapter} has no allocated ranks to plot (method {summary.method}); --plot needs "
                             "an adapter of a budget-adaptive method (adalora, increlora, triadaptlora, colora)")
    if args.json:
        print(json.dumps({"method": summary.method, "format": summary.format, "config": summary.config,
                          "parameters": summary.parameters, "stored_values": summary.stored_values,
                          "file_bytes": summary.file_bytes,
                          "modules": summary.modules, "ranks": summary.ranks}, indent=2, default=list))
    else:
        print(summary.render())
    if args.plot:
        from deltatune.allocate.plots import plot_rank_heatmap

        print(f"rank heat map written to {plot_rank_heatmap(summary.ranks, args.plot)}")
    return 0


def _per_method(pairs: Sequence[str], option: str, example: str) -> list[tuple[str, str]]:
    """`["sara:fraction=0.05"]` -> [("sara", "fraction=0.05")] (option names the flag for the error)."""
    from deltatune.errors import ConfigError

    split = []
    for pair in pairs:
        method, sep, rest = pair.partition(option)
        if not sep or not method or not rest:
            raise ConfigError(f"{pair!r}: expected {example}")
        split.append((method, rest))
    return split


def cmd_compare(args: argparse.Namespace) -> int:
    from deltatune.compare import compare, render_table
    from deltatune.errors import ConfigError
    from deltatune.recipe import FULL, PROBE

    params: dict[str, dict[str, Any]] = {}
    for method, pair in _per_method(args.param, ":", "METHOD:KEY=VALUE, e.g. -p sara:fraction=0.05"):
        if method in args.methods and method not in (PROBE, FULL):
            params.setdefault(method, {}).update(parse_method_params(method, [pair]))
        else:
            params.setdefault(method, {})[pair] = None  # compare() names the problem
    rates = {}
    for method, text in _per_method(args.lr, "=", "METHOD=LR, e.g. --lr sara=1e-2"):
        try:
            rates[method] = float(text)
        except ValueError:
            raise ConfigError(f"--lr {method}={text}: {text!r} is not a number") from None
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1,2") from None
    train = dict(epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                 train_size=args.train_size, max_steps=args.max_steps)
    summaries = compare(args.task, args.methods, params, seeds, out_dir=args.out, lr=rates, plot=args.plot,
                        **train)
    print()
    print(render_table(summaries, args.task, seeds))
    print(f"table written to {Path(args.out) / 'results.md'}; every run in {Path(args.out) / 'runs.jsonl'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deltatune.demo import run_demo

    return run_demo(out_dir=Path(args.out), epochs=args.epochs, train_size=args.train_size)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="lora",
                        help="a registered method (see `deltatune methods`), or probe / full (default: lora)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyper-parameter, repeatable: -p rank=8 -p targets=query,value (module "
                             "names; -p targets=re:PATTERN for a regular expression, all-linear, none)")
    parser.add_argument("--task", default="wordnet-nouns", help="built-in task (default: wordnet-nouns)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's per-method default")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per gloss (default: 32)")
    parser.add_argument("--train-size", type=int, default=None, help="use only this many training examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/train", help="output folder: metrics, checkpoints, adapter")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="also checkpoint every N optimizer steps into OUT/checkpoints (the last is always kept)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in OUT (same settings required)")
    parser.add_argument("--update-rule", default="adamw",
                        help="how gradients become updates: adamw (default), loraplus, lora_pro, lora_pro_light, sam, "
                             "mgpo")
    parser.add_argument("--rule-option", action="append", default=[], metavar="KEY=VALUE",
                        help="update-rule option, repeatable: --rule-option rho=0.1 --rule-option base=loraplus")
    parser.add_argument("--sharding", choices=("ddp", "fsdp"), default="ddp",
                        help="under torchrun: ddp (default; whole model per process) or fsdp (FSDP2 shards)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune", description="Parameter-efficient fine-tuning and model merging for any PyTorch model.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    methods = commands.add_parser("methods", help="list the registered methods")
    methods.set_defaults(func=cmd_methods)

    train = commands.add_parser("train", help="fine-tune a built-in task's model with a method",
                                description="Fine-tune, evaluate on the test split, save the adapter.")
    _add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a saved adapter on a built-in task")
    evaluate.add_argument("adapter", help="adapter folder (deltatune or peft)")
    evaluate.add_argument("--task", default="wordnet-nouns")
    evaluate.add_argument("--split", choices=("validation", "test"), default="test")
    evaluate.add_argument("--max-length", type=int, default=32)
    evaluate.add_argument("--allow-nonfinite", action="store_true",
                          help="load an adapter whose tensors hold NaN or infinite values (refused by default)")
    evaluate.set_defaults(func=cmd_eval)

    inspect = commands.add_parser("inspect", help="show an adapter folder's config, tensors and size")
    inspect.add_argument("adapter", help="adapter folder (deltatune or peft)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--plot", metavar="PNG", help="write the allocated-rank heat map (layers x modules) here")
    inspect.set_defaults(func=cmd_inspect)

    comparison = commands.add_parser(
        "compare", help="train several methods on one task over several seeds, one table",
        description="Train each method on the same task, data and schedule for every seed (the recipe of "
                    "`train`), then print and write a table of test / validation accuracy (mean ± std over seeds), "
                    "trainable parameters and time. Finished runs are kept in OUT/runs.jsonl: re-running the "
                    "same command resumes.",
        epilog="example:\n  deltatune compare probe lora sara bitfit --seeds 0,1,2 --train-size 1000 \\\n"
               "      -p lora:rank=4 -p sara:fraction=0.02 --lr sara=1e-2 --plot --out runs/compare",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    comparison.add_argument("methods", nargs="+", help="registered methods and/or probe, full")
    comparison.add_argument("-p", "--param", action="append", default=[], metavar="METHOD:KEY=VALUE",
                            help="a method's hyper-parameter, repeatable: -p lora:rank=4")
    comparison.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                            help="a method's learning rate, repeatable (default: the recipe's per-method rate)")
    comparison.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    comparison.add_argument("--task", default="wordnet-nouns", help="built-in task (default: wordnet-nouns)")
    comparison.add_argument("--epochs", type=int, default=2)
    comparison.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
    comparison.add_argument("--batch-size", type=int, default=32)
    comparison.add_argument("--max-length", type=int, default=32, help="tokens per gloss (default: 32)")
    comparison.add_argument("--train-size", type=int, default=None, help="use only this many training examples")
    comparison.add_argument("--plot", action="store_true", help="also write OUT/results.png (bar chart)")
    comparison.add_argument("--out", default="runs/compare", help="output folder (runs, table, plot, adapters)")
    comparison.set_defaults(func=cmd_compare)

    demo = commands.add_parser("demo", help="train LoRA on the default task next to a linear-probe baseline")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--train-size", type=int, default=None)
    demo.set_defaults(func=cmd_demo)

    try:
        from deltatune.merging.cli import add_merge_commands
    except ImportError:
        pass
    else:
        add_merge_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from deltatune.errors import DeltatuneError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeltatuneError as error:
        if args.debug:
            raise
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

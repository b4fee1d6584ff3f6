"""deltatune merge vs mergekit 0.1.5 on `slices:` passthrough merges (depth up-scaling, a two-model frankenmerge):
wall time, peak RSS, and the output tensors compared bit for bit.

Uses the same seeded 105.8M-parameter Llama-architecture checkpoints as benchmarks/merge_vs_mergekit.py (hidden
768, intermediate 2048, 8 layers, vocab 32,000, float32, 150 MB shards; built once into --work) and its
measurement: every run a fresh process under GNU time, the tools alternating A B / B A by repeat; median time,
largest peak RSS. mergekit runs from its own venv (--mergekit, default as in merge_vs_mergekit.py).

    .venv/bin/python benchmarks/passthrough_vs_mergekit.py --repeats 3 \
        --json benchmarks/results/passthrough_vs_mergekit.json
    .venv/bin/python benchmarks/passthrough_vs_mergekit.py --render benchmarks/results/passthrough_vs_mergekit.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from deltatune.bench import harness

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_vs_mergekit as shared  # noqa: E402  (the sibling benchmark's checkpoints and measurement)

CASES = {  # name -> [(checkpoint index: 0 the base, 1 the first fine-tune; start; end)]
    "depth up-scaling 0-6 + 2-8 (12 layers)": [(0, 0, 6), (0, 2, 8)],
    "frankenmerge base 0-5 + fine-tune 3-8 (10 layers)": [(0, 0, 5), (1, 3, 8)],
}


def write_config(work: Path, index: int, slices: list[tuple[int, int, int]], folders: list[Path]) -> Path:
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(folders[model]), "layer_range": [start, end]}]}
                         for model, start, end in slices]}
    path = work / f"passthrough-{index}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def compare(left_folder: Path, right_folder: Path) -> dict:
    left, right = shared.load_folder(left_folder), shared.load_folder(right_folder)
    if set(left) != set(right):
        return {"same_names": False, "only_mergekit": sorted(set(left) - set(right))[:5],
                "only_deltatune": sorted(set(right) - set(left))[:5]}
    identical = sum(left[n].dtype == right[n].dtype and torch.equal(left[n], right[n]) for n in left)
    worst = max(float((left[n].double() - right[n].double()).abs().max()) for n in left)
    configs = [json.loads((folder / "config.json").read_text()) for folder in (left_folder, right_folder)]
    return {"same_names": True, "tensors": len(left), "bit_identical_tensors": identical,
            "entries": sum(t.numel() for t in left.values()), "max_abs_diff": worst,
            "num_hidden_layers": [c["num_hidden_layers"] for c in configs]}


def render_markdown(raw: dict) -> str:
    mib = 2**20
    lines = ["| case | mergekit time (s) | deltatune time (s) | time ratio | mergekit peak RSS (MiB) | "
             "deltatune peak RSS (MiB) | RSS ratio | bit-identical tensors | num_hidden_layers (mergekit, ours) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, runs in raw["runs"].items():
        mk_time = statistics.median(r["seconds"] for r in runs["mergekit"])
        dt_time = statistics.median(r["seconds"] for r in runs["deltatune"])
        mk_rss = max(r["peak_rss"] for r in runs["mergekit"])
        dt_rss = max(r["peak_rss"] for r in runs["deltatune"])
        c = raw["comparison"].get(case, {})
        lines.append(f"| {case} | {mk_time:.2f} | {dt_time:.2f} | **{dt_time / mk_time:.2f}** | {mk_rss / mib:.0f} | "
                     f"{dt_rss / mib:.0f} | **{dt_rss / mk_rss:.2f}** | "
                     f"{c.get('bit_identical_tensors', '–')}/{c.get('tensors', '–')} | "
                     f"{c.get('num_hidden_layers', '–')} |")
    lines += ["", "Raw runs (seconds / peak RSS MiB), in the order they ran within each repeat:", ""]
    for case, runs in raw["runs"].items():
        for tool, results in runs.items():
            lines.append(f"- {case}, {tool}: {shared.raw_runs(results)}")
    lines += ["", "Comparisons:", ""] + [f"- {case}: {value}" for case, value in raw["comparison"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-merge-bench")
    parser.add_argument("--mergekit", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None)
    args = parser.parse_args()
    if args.render:
        print(render_markdown(json.loads(args.render.read_text())))
        return
    mergekit = shared.mergekit_command(args.mergekit)
    args.work.mkdir(parents=True, exist_ok=True)
    folders = shared.build_checkpoints(args.work, args.hidden, args.intermediate, 8, args.vocab)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(shared.ROOT / "src")}
    raw = shared.empty_raw_record(folders)
    for index, (case, slices) in enumerate(CASES.items()):
        config = write_config(args.work, index, slices, folders)
        outputs = {tool: args.work / f"out-passthrough-{index}-{tool}" for tool in ("mergekit", "deltatune")}
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
        tools = {tool: shared.commands(tool, config, outputs[tool], mergekit) for tool in outputs}
        shared.measure(case, raw["runs"].setdefault(case, {}), tools, args.repeats, env)
        raw["comparison"][case] = compare(outputs["mergekit"], outputs["deltatune"])
        print(case, raw["comparison"][case], flush=True)
    raw["load_average_at_end"] = os.getloadavg()
    if args.json:
        harness.write_json(args.json, raw, indent=2)
    print(render_markdown(raw))


if __name__ == "__main__":
    main()

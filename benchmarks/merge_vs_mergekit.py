"""deltatune merge vs mergekit 0.1.5 on the same checkpoints and the same YAML: wall time, peak RSS, tensors.

Builds (once, seeded) a small Llama-architecture base checkpoint with transformers and three fine-tune-like
perturbations of it (base + Gaussian deltas of different scales per model, plus a shared component so signs
agree and conflict), all saved as sharded safetensors. Then, for each method (default task_arithmetic, ties,
dare_ties; `--methods` adds issue 16's slerp, model_stock, breadcrumbs_ties, della, sce, nuslerp, multislerp)
and each repeat, runs `mergekit-yaml` (from its own venv) and `deltatune merge` on the same YAML,
each in a fresh process, alternating which goes first, and records wall time and the child's peak RSS
(GNU time). Finally compares the merged tensors entry by entry (max |difference|).

mergekit runs from its own virtual environment, never the project's: `--mergekit` (default: $MERGEKIT_YAML,
else `venv-mergekit/bin/mergekit-yaml` below the working directory, else `mergekit-yaml` on the PATH). The
checkpoints and merged outputs go to `--work` (default: the system's temporary folder). `--render` re-prints the
table from a saved `--json` file without running anything.

    python3 -m venv venv-mergekit && venv-mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python benchmarks/merge_vs_mergekit.py --repeats 3 --json benchmarks/results/merge_vs_mergekit.json
    .venv/bin/python benchmarks/merge_vs_mergekit.py --render benchmarks/results/merge_vs_mergekit.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/merge_vs_mergekit.py --repeats 1 --bf16-repeats 0 \
        --methods slerp model_stock breadcrumbs_ties della sce nuslerp multislerp \
        --json benchmarks/results/merge_methods_vs_mergekit.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltatune.bench import harness
from deltatune.errors import BenchmarkError

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_VENV = Path("venv-mergekit") / "bin" / "mergekit-yaml"
METHODS = {
    "task_arithmetic": {"parameters": {"lambda": 0.8}, "model": [{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.3}]},
    "ties": {"parameters": {"normalize": True, "lambda": 1.0},
             "model": [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.5}, {"weight": 0.3,
                                                                                        "density": 0.7}]},
    "dare_ties": {"parameters": {"lambda": 1.0},
                  "model": [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": 0.5},
                            {"weight": 0.3, "density": 0.7}]},
    # issue 16's methods (run with --methods ...; not in the default set)
    "slerp": {"parameters": {"t": [0.0, 0.5, 1.0]}, "model": [{}]},
    "model_stock": {"parameters": {}, "model": [{}, {}, {}]},
    "breadcrumbs_ties": {"parameters": {"lambda": 1.0},
                         "model": [{"weight": 1.0, "density": 0.3, "gamma": 0.01}, {"weight": 0.6, "density": 0.5},
                                   {"weight": 0.3, "density": 0.7}]},
    "della": {"parameters": {"lambda": 1.0},
              "model": [{"weight": 1.0, "density": 0.3, "epsilon": 0.1}, {"weight": 0.6, "density": 0.5},
                        {"weight": 0.3, "density": 0.7}]},
    "sce": {"parameters": {"select_topk": 0.5}, "model": [{}, {}, {}]},
    "nuslerp": {"parameters": {}, "model": [{"weight": 0.4}, {"weight": 0.6}]},
    # without a base: with one, the untouched RMSNorm gains give all-zero task vectors, which mergekit refuses
    # ("the weighted sum of the input tensors is zero") for more than two models
    "multislerp": {"parameters": {}, "model": [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], "base": False},
}
DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_ties")
RANDOM_METHODS = ("dare", "della")  # name prefixes: mergekit's global RNG vs deltatune's per-tensor seeds


def build_checkpoints(work: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = [work / "base"] + [work / f"finetune{i}" for i in range(3)]
    if all((f / "config.json").is_file() for f in folders):
        return folders
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(folders[0], max_shard_size="150MB")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape, generator=generator) * 0.01 * v.std() for k, v in base.items()}
    for index, folder in enumerate(folders[1:]):
        scale = (0.5, 1.0, 2.0)[index]
        state = {k: v + shared[k] + torch.randn(v.shape, generator=generator) * 0.01 * scale * v.std()
                 for k, v in base.items()}
        model.load_state_dict(state)
        model.save_pretrained(folder, max_shard_size="150MB")
    return folders


def write_config(work: Path, method: str, folders: list[Path], dtype: str, extra: dict | None = None,
                 label: str | None = None) -> Path:
    import yaml

    spec = METHODS[method]
    config = {"merge_method": method, **({"base_model": str(folders[0])} if spec.get("base", True) else {}),
              "dtype": dtype,
              "parameters": {**spec["parameters"], **(extra or {})},
              "models": [{"model": str(f), **({"parameters": p} if p else {})}
                         for f, p in zip(folders[1:], spec["model"])]}
    path = work / f"{label or method}-{dtype}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def bfloat16_copies(work: Path, folders: list[Path]) -> list[Path]:
    """The same checkpoints stored in bfloat16 (for the half-precision parity check)."""
    from safetensors.torch import load_file, save_file

    copies = []
    for folder in folders:
        target = work / "bf16" / folder.name
        if not (target / "config.json").is_file():
            target.mkdir(parents=True, exist_ok=True)
            for file in folder.iterdir():
                if file.suffix == ".safetensors":
                    save_file({k: v.to(torch.bfloat16) for k, v in load_file(file).items()}, str(target / file.name),
                              metadata={"format": "pt"})
                else:
                    shutil.copyfile(file, target / file.name)
        copies.append(target)
    return copies


def run_measured(command: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a fresh child process, measured by GNU time.

    GNU time is a small process, so its child's ru_maxrss does not inherit this (large) process's memory, as a
    direct fork would (Linux carries the high-water mark across exec).
    """
    start = time.perf_counter()
    result = harness.run_process(["/usr/bin/time", "-f", "@@%M", *command], env=env)
    seconds = time.perf_counter() - start
    peak_kib = int(result.stderr.rsplit("@@", 1)[1].split()[0])
    return seconds, peak_kib * 1024


def mergekit_command(given: Path | None) -> Path:
    """The mergekit-yaml executable: --mergekit, $MERGEKIT_YAML, ./venv-mergekit, or the PATH; else a clear error."""
    candidates = [given] if given is not None else [
        Path(os.environ["MERGEKIT_YAML"]) if os.environ.get("MERGEKIT_YAML") else None, MERGEKIT_VENV,
        Path(found) if (found := shutil.which("mergekit-yaml")) else None]
    for candidate in candidates:
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    where = given or f"$MERGEKIT_YAML, {MERGEKIT_VENV} or the PATH"
    raise BenchmarkError(f"mergekit-yaml not found at {where}; install mergekit 0.1.5 in its own venv "
                         "(python3 -m venv venv-mergekit && venv-mergekit/bin/pip install torch==2.13.0 "
                         "mergekit==0.1.5) and pass --mergekit venv-mergekit/bin/mergekit-yaml")


def commands(tool: str, config: Path, out: Path, mergekit_bin: Path) -> list[str]:
    if tool == "mergekit":
        return [str(mergekit_bin), str(config), str(out), "--quiet"]
    return [sys.executable, "-m", "deltatune.cli", "merge", str(config), "--out", str(out), "--overwrite",
            "--no-progress"]


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def compare(mergekit_out: Path, deltatune_out: Path, base: Path) -> dict:
    """Entry-by-entry comparison, plus the relative L2 distance of the merged deltas (merged − base)."""
    left, right, origin = load_folder(mergekit_out), load_folder(deltatune_out), load_folder(base)
    if set(left) != set(right):
        return {"same_names": False, "only_mergekit": sorted(set(left) - set(right))[:5],
                "only_deltatune": sorted(set(right) - set(left))[:5]}
    worst, differing, total, distance, norm = 0.0, 0, 0, 0.0, 0.0
    for name in left:
        a, b, o = left[name].double(), right[name].double(), origin[name].double()
        worst = max(worst, float((a - b).abs().max()))
        differing += int((a != b).sum())
        total += a.numel()
        distance += float(((a - o) - (b - o)).square().sum())
        norm += float((a - o).square().sum())
    identical = sum(torch.equal(left[n], right[n]) for n in left)
    return {"same_names": True, "tensors": len(left), "bit_identical_tensors": identical,
            "differing_entries": differing, "entries": total, "max_abs_diff": worst,
            "delta_relative_l2": (distance / norm) ** 0.5 if norm else 0.0}


def measure(label: str, runs: dict, tools: dict[str, list[str]], repeats: int, env: dict) -> None:
    """Alternate the tools repeat by repeat (A B, B A, ...), each run in a fresh process."""
    names = list(tools)
    for repeat in range(repeats):
        for tool in (names if repeat % 2 == 0 else names[::-1]):
            seconds, rss = run_measured(tools[tool], env)
            runs.setdefault(tool, []).append({"seconds": seconds, "peak_rss": rss})
            print(f"{label:<22} {tool:<16} repeat {repeat}: {seconds:6.2f} s, {rss / 2**20:7.0f} MiB", flush=True)


def summary_rows(raw: dict) -> list[dict]:
    rows = []
    for label, runs in raw["runs"].items():
        mergekit = runs["mergekit"]
        for tool, results in runs.items():
            if tool == "mergekit":
                continue
            mk_time = statistics.median(r["seconds"] for r in mergekit)
            dt_time = statistics.median(r["seconds"] for r in results)
            mk_rss = max(r["peak_rss"] for r in mergekit)
            dt_rss = max(r["peak_rss"] for r in results)
            rows.append({"case": label, "tool": tool, "mergekit_s": mk_time, "deltatune_s": dt_time,
                         "time_ratio": dt_time / mk_time, "mergekit_rss": mk_rss, "deltatune_rss": dt_rss,
                         "rss_ratio": dt_rss / mk_rss, "comparison": raw["comparison"].get(f"{label}/{tool}", {})})
    return rows



def raw_runs(results: list[dict]) -> str:
    """One tool's runs of a case as "12.34 s / 567, ..." (seconds / peak RSS MiB), in the order they ran."""
    return ", ".join(f"{r['seconds']:.2f} s / {r['peak_rss'] / 2**20:.0f}" for r in results)

def render_markdown(raw: dict) -> str:
    """The results table (median wall time, max peak RSS, ratios) and the tensor comparisons, from raw results."""
    mib = 2**20
    lines = ["| case | deltatune variant | mergekit time (s) | deltatune time (s) | time ratio | "
             "mergekit peak RSS (MiB) | deltatune peak RSS (MiB) | RSS ratio | bit-identical tensors | "
             "differing entries | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in raw["summary"]:
        c = row["comparison"]
        same = f"{c.get('bit_identical_tensors', '–')}/{c.get('tensors', '–')}"
        lines.append(f"| {row['case']} | {row['tool']} | {row['mergekit_s']:.2f} | {row['deltatune_s']:.2f} | "
                     f"**{row['time_ratio']:.2f}** | {row['mergekit_rss'] / mib:.0f} | "
                     f"{row['deltatune_rss'] / mib:.0f} | **{row['rss_ratio']:.2f}** | {same} | "
                     f"{c.get('differing_entries', '–'):,} of {c.get('entries', 0):,} | "
                     f"{c.get('max_abs_diff', 0):.3g} |")
    lines += ["", "Raw runs (seconds, peak RSS MiB), in the order they ran within each repeat:", ""]
    for case, runs in raw["runs"].items():
        for tool, results in runs.items():
            lines.append(f"- {case}, {tool}: {raw_runs(results)}")
    lines += ["", "Tensor comparisons (delta_relative_l2 = ‖Δ_mergekit − Δ_deltatune‖ / ‖Δ_mergekit‖ over all tensors, "
              "Δ = merged − base):", ""]
    for key, value in raw["comparison"].items():
        lines.append(f"- {key}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in value.items()))
    return "\n".join(lines) + "\n"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-merge-bench",
                        help="checkpoints and merged outputs (default: in the system's temporary folder)")
    parser.add_argument("--mergekit", type=Path, default=None,
                        help="mergekit-yaml of mergekit's own venv (default: $MERGEKIT_YAML, ./venv-mergekit, PATH)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    parser.add_argument("--bf16-repeats", type=int, default=1, help="runs of the bfloat16 parity cases (0: skip)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--render", type=Path, default=None, help="only print the Markdown of a saved --json file")
    args = parser.parse_args()
    if not args.render:
        try:
            args.mergekit = mergekit_command(args.mergekit)
        except BenchmarkError as error:
            parser.error(str(error))
    return args


def empty_raw_record(folders: list[Path]) -> dict:
    """The raw results before any run: machine, environment and the size of one input checkpoint."""
    environment = harness.environment()
    machine = {"cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "python": environment["python"], "commit": environment["commit"],
               "load_average_at_start": os.getloadavg()}
    return {"machine": machine, "date": environment["date"], "environment": environment,
            "model_bytes": sum(f.stat().st_size for f in folders[0].glob("*.safetensors")),
            "command": environment["command"], "runs": {}, "comparison": {}}


def planned_cases(args: argparse.Namespace, folders: list[Path]) -> list[tuple[str, str, list[Path], int]]:
    """(method, dtype, input checkpoints, repeats): every method in float32, then the bfloat16 parity cases."""
    cases = [(method, "float32", folders, args.repeats) for method in args.methods]
    if args.bf16_repeats:
        copies = bfloat16_copies(args.work, folders)
        cases += [(method, "bfloat16", copies, args.bf16_repeats) for method in ("task_arithmetic", "ties")
                  if method in args.methods]
    return cases


def case_tools(args: argparse.Namespace, method: str, dtype: str, inputs: list[Path],
               outputs: dict[str, Path]) -> tuple[Path, dict[str, list[str]]]:
    """The case's YAML and the command of each contender (TIES adds deltatune's index tie rule)."""
    config = write_config(args.work, method, inputs, dtype)
    tools = {"mergekit": commands("mergekit", config, outputs["mergekit"], args.mergekit),
             "deltatune": commands("deltatune", config, outputs["deltatune"], args.mergekit)}
    if method == "ties":  # deltatune's faster deterministic tie rule, against the same mergekit runs
        index_config = write_config(args.work, method, inputs, dtype, {"tie_break": "index"}, "ties-index")
        tools["deltatune tie_break=index"] = commands("deltatune", index_config, outputs["index"], args.mergekit)
    return config, tools


def compare_seeds(args: argparse.Namespace, raw: dict, env: dict, case: tuple[str, str, list[Path], int],
                  config: Path, seed0_output: Path) -> None:
    """For a random method: how far apart two deltatune seeds are, for scale."""
    method, dtype, inputs, _ = case
    label = f"{method} {dtype}"
    reseeded = args.work / f"out-{method}-{dtype}-seed1"
    harness.run_process([*commands("deltatune", config, reseeded, args.mergekit), "--seed", "1"], env=env)
    key = f"{label}/deltatune seed 0 vs seed 1"
    raw["comparison"][key] = compare(reseeded, seed0_output, inputs[0])
    print(label, "seed 0 vs 1", raw["comparison"][key], flush=True)


def run_case(args: argparse.Namespace, raw: dict, env: dict, case: tuple[str, str, list[Path], int]) -> None:
    """Time every contender of one case, then compare each deltatune output with mergekit's, tensor by tensor."""
    method, dtype, inputs, repeats = case
    label = f"{method} {dtype}"
    outputs = {tool: args.work / f"out-{method}-{dtype}-{tool}" for tool in ("mergekit", "deltatune", "index")}
    config, tools = case_tools(args, method, dtype, inputs, outputs)
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    measure(label, raw["runs"].setdefault(label, {}), tools, repeats, env)
    for tool, out in (("deltatune", outputs["deltatune"]), ("deltatune tie_break=index", outputs["index"])):
        if out.exists():
            raw["comparison"][f"{label}/{tool}"] = compare(outputs["mergekit"], out, inputs[0])
            print(label, tool, raw["comparison"][f"{label}/{tool}"], flush=True)
    if method.startswith(RANDOM_METHODS):
        compare_seeds(args, raw, env, case, config, outputs["deltatune"])


def print_summary(rows: list[dict]) -> None:
    for row in rows:
        print(f"{row['case']:<22} {row['tool']:<26} time ratio {row['time_ratio']:.2f}  "
              f"peak RSS ratio {row['rss_ratio']:.2f}")


def main() -> None:
    args = parse_arguments()
    if args.render:
        print(render_markdown(json.loads(args.render.read_text())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    folders = build_checkpoints(args.work, args.hidden, args.intermediate, args.layers, args.vocab)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    raw = empty_raw_record(folders)
    for case in planned_cases(args, folders):
        run_case(args, raw, env, case)
        if args.json:  # after every case, so an interrupted run keeps what it measured
            harness.write_json(args.json, {**raw, "summary": summary_rows(raw), "partial": True}, indent=2)
    raw["summary"] = summary_rows(raw)
    print_summary(raw["summary"])
    raw["load_average_at_end"] = os.getloadavg()
    if args.json:
        harness.write_json(args.json, raw, indent=2)
    print(render_markdown(raw))


if __name__ == "__main__":
    main()

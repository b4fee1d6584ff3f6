"""deltatune extract-lora vs mergekit-extract-lora 0.1.5 on the same checkpoints: time, peak RSS, error at equal size.

Builds (once, seeded) the base of `benchmarks/merge_vs_mergekit.py` (the same seeded Llama-architecture model,
default 105.8M parameters) and one fine-tune-like perturbation of it: every Linear weight gets a real low-rank
component (rank 4-48, varying by layer, with a decaying spectrum) plus dense Gaussian noise; embeddings and norms
get small noise. Then, each in a fresh process timed by GNU time (wall, peak RSS), alternating which tool goes
first by repeat, with one thread each (OMP_NUM_THREADS=1):

- `fixed`: `mergekit-extract-lora --max-rank R` vs `deltatune extract-lora --rank R` (same size by construction);
- `adaptive`: `deltatune extract-lora --energy E --layout pattern`, E the largest energy (found here from the
  layers' spectra) whose adapter has at most the fixed-rank adapter's LoRA parameters: equal size, ranks moved to
  the layers that need them;
- `randomized`: `deltatune extract-lora --rank R --solver randomized` (svd_lowrank, oversampling 10, 2 power
  iterations): same size as `fixed`, approximate factors.

The reconstruction error of every layer is computed here, from the written files, against the true ΔW in float64
(relative Frobenius error ‖ΔW − s·B A‖ / ‖ΔW‖), not taken from either tool's report.

    .venv/bin/python benchmarks/extract_vs_mergekit.py --repeats 3 --json benchmarks/results/extract_vs_mergekit.json
    .venv/bin/python benchmarks/extract_vs_mergekit.py --render benchmarks/results/extract_vs_mergekit.json
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

from deltatune.bench import harness
from deltatune.errors import BenchmarkError
from deltatune.merging.algebra.lowrank import RankRule, choose_rank
from merge_vs_mergekit import load_folder, raw_runs, run_measured

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_VENV = Path("venv-mergekit") / "bin" / "mergekit-extract-lora"
COMPONENT_RANKS = (4, 8, 16, 32, 48)


def build_checkpoints(work: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """merge_vs_mergekit's seeded base, and a fine-tune = base + low-rank component + noise per Linear weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base_dir, ft_dir = work / "base", work / "finetune-lowrank"
    if (base_dir / "config.json").is_file() and (ft_dir / "config.json").is_file():
        return base_dir, ft_dir
    torch.manual_seed(0)  # the same construction as merge_vs_mergekit.build_checkpoints: the same base
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(base_dir, max_shard_size="150MB")
    generator = torch.Generator().manual_seed(2)
    state = model.state_dict()
    with torch.no_grad():
        for index, (name, weight) in enumerate(state.items()):
            scale = float(weight.std()) if weight.numel() > 1 else 1.0
            if weight.ndim == 2 and "embed" not in name and "lm_head" not in name:
                rank = COMPONENT_RANKS[index % len(COMPONENT_RANKS)]
                spectrum = torch.logspace(0, -1.5, rank)  # σ_i falling 30x over the component
                left = torch.linalg.qr(torch.randn(weight.shape[0], rank, generator=generator))[0]
                right = torch.linalg.qr(torch.randn(weight.shape[1], rank, generator=generator))[0]
                component = (left * spectrum) @ right.T
                component *= 0.05 * scale * weight.numel() ** 0.5 / float(component.norm())
                weight.add_(component + 0.002 * scale * torch.randn(weight.shape, generator=generator))
            else:
                weight.add_(0.01 * scale * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(ft_dir, max_shard_size="150MB")
    return base_dir, ft_dir


def linear_deltas(base_dir: Path, ft_dir: Path) -> dict[str, torch.Tensor]:
    """The true ΔW (float64) of every Linear weight the tools decompose (not embeddings, head or norms)."""
    base, ft = load_folder(base_dir), load_folder(ft_dir)
    return {name.removesuffix(".weight"): (ft[name].double() - base[name].double()) for name in ft
            if ft[name].ndim == 2 and "embed" not in name and "lm_head" not in name}


def equal_size_energy(deltas: dict[str, torch.Tensor], budget: int, steps: int = 40) -> tuple[float, int]:
    """The largest energy whose per-layer ranks give at most `budget` LoRA parameters (bisection on spectra)."""
    spectra = {name: torch.linalg.svdvals(delta.float()).double() for name, delta in deltas.items()}

    def parameters(energy: float) -> int:
        return sum(choose_rank(values, RankRule(energy=energy)) * sum(deltas[name].shape)
                   for name, values in spectra.items())

    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if parameters(middle) <= budget else (low, middle)
    return low, parameters(low)


def _pattern(config: dict, key: str, path: str, default):
    for pattern, value in (config.get(key) or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return value
    return default


def adapter_errors(out: Path, deltas: dict[str, torch.Tensor]) -> dict:
    """Per-layer relative error of the adapter in `out` against the true ΔW; LoRA parameters and file size."""
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_folder(out)
    layers, stored, effective = {}, 0, 0
    norm_sq = error_sq = 0.0
    for path, delta in deltas.items():
        key = f"base_model.model.{path}"
        if f"{key}.lora_A.weight" in tensors:
            down, up = tensors[f"{key}.lora_A.weight"].double(), tensors[f"{key}.lora_B.weight"].double()
            rank = _pattern(config, "rank_pattern", path, config["r"])
            scale = _pattern(config, "alpha_pattern", path, config["lora_alpha"]) / rank
            approx = scale * up @ down
            stored += down.numel() + up.numel()
            nonzero = int((down.abs().sum(1) > 0).sum())
            effective += nonzero * (down.shape[1] + up.shape[0])
        else:
            approx, nonzero = torch.zeros_like(delta), 0
        error, norm = float((delta - approx).norm()), float(delta.norm())
        layers[path] = {"rank": nonzero, "relative_error": error / norm}
        norm_sq, error_sq = norm_sq + norm**2, error_sq + error**2
    return {"layers": layers, "stored_lora_parameters": stored, "effective_lora_parameters": effective,
            "total_relative_error": (error_sq / norm_sq) ** 0.5,
            "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size}


def product_difference(first: Path, second: Path, deltas: dict[str, torch.Tensor]) -> float:
    """max |B A − B' A'| over the layers of two adapters (the factors' signs may differ, products may not)."""
    left, right = load_folder(first), load_folder(second)
    worst = 0.0
    for path in deltas:
        key = f"base_model.model.{path}"
        a = left[f"{key}.lora_B.weight"].double() @ left[f"{key}.lora_A.weight"].double()
        b = right[f"{key}.lora_B.weight"].double() @ right[f"{key}.lora_A.weight"].double()
        worst = max(worst, float((a - b).abs().max()))
    return worst


def tool_commands(args: argparse.Namespace, base: Path, ft: Path, energy: float | None) -> dict[str, list[str]]:
    work = args.work
    commands = {
        "mergekit": [str(args.mergekit), "--model", str(ft), "--base-model", str(base), "--out-path",
                     str(work / "out-mergekit"), "--max-rank", str(args.rank), "--quiet"],
        "deltatune": [sys.executable, "-m", "deltatune.cli", "extract-lora", str(base), str(ft),
                      str(work / "out-deltatune"), "--rank", str(args.rank), "--overwrite", "--quiet",
                      "--threads", "1"],
    }
    commands["deltatune randomized"] = [sys.executable, "-m", "deltatune.cli", "extract-lora", str(base), str(ft),
                                        str(work / "out-deltatune-randomized"), "--rank", str(args.rank), "--solver",
                                        "randomized", "--overwrite", "--quiet", "--threads", "1"]
    if energy is not None:
        commands["deltatune adaptive"] = [sys.executable, "-m", "deltatune.cli", "extract-lora", str(base), str(ft),
                                          str(work / "out-deltatune-adaptive"), "--energy", repr(energy), "--layout",
                                          "pattern", "--overwrite", "--quiet", "--threads", "1"]
    return commands


def measure(runs: dict, tools: dict[str, list[str]], repeats: int, env: dict, work: Path) -> None:
    names = list(tools)
    for repeat in range(repeats):
        for tool in (names if repeat % 2 == 0 else names[::-1]):
            if tool == "mergekit":  # mergekit writes into an existing folder; start it clean like deltatune's
                shutil.rmtree(work / "out-mergekit", ignore_errors=True)
            seconds, rss = run_measured(tools[tool], env)
            runs.setdefault(tool, []).append({"seconds": seconds, "peak_rss": rss})
            print(f"{tool:<20} repeat {repeat}: {seconds:6.2f} s, {rss / 2**20:7.0f} MiB", flush=True)


def render_markdown(raw: dict) -> str:
    mib = 2**20
    runs, errors = raw["runs"], raw["errors"]
    mk_time = statistics.median(r["seconds"] for r in runs["mergekit"])
    mk_rss = max(r["peak_rss"] for r in runs["mergekit"])
    lines = ["| tool | rule | median time (s) | time ratio | peak RSS (MiB) | RSS ratio | LoRA parameters "
             "(effective / stored) | total relative error | adapter file (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    rules = {"mergekit": f"--max-rank {raw['rank']}", "deltatune": f"--rank {raw['rank']}",
             "deltatune adaptive": f"--energy {raw['energy']:.6f} --layout pattern",
             "deltatune randomized": f"--rank {raw['rank']} --solver randomized"}
    for tool, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        rss = max(r["peak_rss"] for r in results)
        e = errors[tool]
        lines.append(f"| {tool} | `{rules[tool]}` | {seconds:.2f} | **{seconds / mk_time:.2f}** | {rss / mib:.0f} | "
                     f"**{rss / mk_rss:.2f}** | {e['effective_lora_parameters']:,} / {e['stored_lora_parameters']:,} | "
                     f"{e['total_relative_error']:.5f} | {e['adapter_bytes'] / 1e6:.1f} |")
    lines += ["", "Per-layer relative Frobenius error ‖ΔW − B A‖ / ‖ΔW‖ (rank in brackets):", "",
              "| layer | mergekit | deltatune (fixed) | deltatune adaptive (equal size) | deltatune randomized |",
              "|---|---|---|---|---|"]
    for path in errors["mergekit"]["layers"]:
        cells = [f"{errors[t]['layers'][path]['relative_error']:.4f} ({errors[t]['layers'][path]['rank']})"
                 for t in ("mergekit", "deltatune", "deltatune adaptive", "deltatune randomized") if t in errors]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines += ["", "Raw runs (seconds / peak RSS MiB), in the order they ran within each repeat:", ""]
    for tool, results in runs.items():
        lines.append(f"- {tool}: {raw_runs(results)}")
    lines.append(f"- max |B A (mergekit) − B A (deltatune)| over all layers: {raw['product_difference']:.3g}")
    return "\n".join(lines) + "\n"


def mergekit_command(given: Path | None) -> Path:
    candidates = [given] if given is not None else [MERGEKIT_VENV]
    for candidate in candidates:
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    raise BenchmarkError("mergekit-extract-lora not found; install mergekit 0.1.5 in its own venv (python3 -m venv "
                         "venv-mergekit && venv-mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5) and pass "
                         "--mergekit venv-mergekit/bin/mergekit-extract-lora")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-extract-bench")
    parser.add_argument("--mergekit", type=Path, default=None, help="mergekit-extract-lora of mergekit's own venv")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--render", type=Path, default=None, help="only print the Markdown of a saved --json file")
    args = parser.parse_args()
    if not args.render:
        try:
            args.mergekit = mergekit_command(args.mergekit)
        except BenchmarkError as error:
            parser.error(str(error))
    return args


def main() -> None:
    args = parse_arguments()
    if args.render:
        print(render_markdown(json.loads(args.render.read_text())))
        return
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    base, ft = build_checkpoints(args.work, args.hidden, args.intermediate, args.layers, args.vocab)
    deltas = linear_deltas(base, ft)
    budget = sum(args.rank * sum(delta.shape) for delta in deltas.values())
    energy, adaptive_parameters = equal_size_energy(deltas, budget)
    print(f"fixed rank {args.rank}: {budget:,} LoRA parameters; equal-size energy {energy:.6f} "
          f"({adaptive_parameters:,})", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    environment = harness.environment()
    raw = {"date": environment["date"], "environment": environment, "command": environment["command"],
           "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "load_average_at_start": os.getloadavg()},
           "rank": args.rank, "energy": energy, "budget": budget, "parameters": sum(
               v.numel() for v in load_folder(base).values()), "runs": {}}
    measure(raw["runs"], tool_commands(args, base, ft, energy), args.repeats, env, args.work)
    outputs = {"mergekit": "out-mergekit", "deltatune": "out-deltatune", "deltatune adaptive": "out-deltatune-adaptive",
               "deltatune randomized": "out-deltatune-randomized"}
    raw["errors"] = {tool: adapter_errors(args.work / folder, deltas) for tool, folder in outputs.items()}
    raw["product_difference"] = product_difference(args.work / "out-mergekit", args.work / "out-deltatune", deltas)
    raw["machine"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        harness.write_json(args.json, raw, indent=2)
    print(render_markdown(raw))


if __name__ == "__main__":
    main()

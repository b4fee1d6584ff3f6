"""Mixed-adapter batches vs running the adapters one after another, and hot-swapping vs fresh compiles.

Model: all-MiniLM-L6-v2 + mean pooling + Linear(384, 10) head (frozen), float32, the first 32 wordnet-nouns
glosses padded to 32 tokens (the batch of `lora_vs_peft.py`), LoRA rank 8 on query and value, k = 2 / 4 / 8
adapters (random non-zero factors, one seed each), the 32 samples split evenly between them (sample i ->
adapter i mod k). Contenders, timed side by side in blocks of alternating order after warm-up:

- inference, "mixed": one forward of the 32-sample batch under `deltatune.route`;
- inference, "sequential": k forwards, each adapter active on its own 32/k samples;
- training step, "mixed": `MultiAdapterTraining.step` (one forward + backward, k AdamW steps);
- training step, "sequential": per adapter, forward + backward + AdamW step on its sub-batch.

Hot-swap table: three saved LoRA adapters (ranks 4, 8, 16; alphas 8, 16, 4) served by a `torch.compile`d model
(backend "eager"): "fresh" loads each on a fresh base and compiles it; "swap" prepares the first for max rank 16,
compiles once and hot-swaps the other two in. Dynamo's frame compiles are counted with a counting backend; the
output of every swapped-in adapter is compared with an eager fresh load of it.

`--single-step` prints the median time of one plain single-adapter LoRA training step and forward (no routing),
so that two checkouts can be compared (`PYTHONPATH=<checkout>/src`): routing must cost nothing when unused.

    flock /work/wt/heavy.lock env HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/mixed_batches.py \
        --threads 2 --output benchmarks/results/mixed_batches.md
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deltatune as dt  # noqa: E402
import lora_vs_peft as shared  # noqa: E402
from deltatune.bench import harness  # noqa: E402

ADAPTER_COUNTS = (2, 4, 8)
SWAP_ADAPTERS = ((4, 8.0), (8, 16.0), (16, 4.0))  # (rank, alpha)


def adapted(base: nn.Module, count: int) -> nn.Module:
    """`count` LoRA adapters a0..a{count-1} on a copy of `base`, factors drawn from one seed each."""
    model = copy.deepcopy(base)
    for index in range(count):
        torch.manual_seed(100 + index)
        dt.adapt(model, dt.LoRAConfig(rank=shared.RANK, alpha=shared.ALPHA, targets=list(shared.TARGETS),
                                      init="random"), f"a{index}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def rows_of(count: int, batch: int) -> tuple[list[str], dict[str, list[int]]]:
    names = [f"a{i % count}" for i in range(batch)]
    return names, {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}


def sub_batch(inputs: dict[str, Tensor], rows: list[int]) -> dict[str, Tensor]:
    return {key: value[rows] for key, value in inputs.items()}


def inference_actions(model: nn.Module, inputs: dict[str, Tensor], count: int) -> dict[str, Callable[[], object]]:
    names, groups = rows_of(count, len(inputs["input_ids"]))

    def mixed() -> Tensor:
        with torch.no_grad(), dt.route(model, names):
            return model(**inputs)

    def sequential() -> list[Tensor]:
        outputs = []
        with torch.no_grad():
            for name, rows in groups.items():
                dt.set_active(model, [name])
                outputs.append(model(**sub_batch(inputs, rows)))
        return outputs

    return {"mixed": mixed, "sequential": sequential}


def check_equal(model: nn.Module, inputs: dict[str, Tensor], count: int) -> float:
    """max |mixed - sequential| logit difference, rows put back in batch order."""
    actions = inference_actions(model, inputs, count)
    _, groups = rows_of(count, len(inputs["input_ids"]))
    mixed, parts = actions["mixed"](), actions["sequential"]()
    order = [row for rows in groups.values() for row in rows]
    return float((mixed[order] - torch.cat(parts)).abs().max())


def training_actions(model: nn.Module, inputs: dict[str, Tensor], labels: Tensor,
                     count: int) -> dict[str, Callable[[], object]]:
    from deltatune.train.multi_adapter import MultiAdapterTraining

    names, groups = rows_of(count, len(labels))
    adapter_names = [f"a{i}" for i in range(count)]
    together = MultiAdapterTraining(model, adapter_names, lambda ps: torch.optim.AdamW(ps, lr=shared.LEARNING_RATE))
    model.train()
    alone = {name: torch.optim.AdamW([p for _, _, d in dt.iter_deltas(model, name) for p in d.parameters()],
                                     lr=shared.LEARNING_RATE) for name in adapter_names}

    def mixed() -> object:
        return together.step(names, lambda: F.cross_entropy(model(**inputs), labels, reduction="none"))

    def sequential() -> None:
        for name, rows in groups.items():
            dt.set_active(model, [name])
            F.cross_entropy(model(**sub_batch(inputs, rows)), labels[rows]).backward()
            alone[name].step()
            alone[name].zero_grad()

    return {"mixed": mixed, "sequential": sequential}


def timed_medians(actions: dict[str, Callable[[], object]], blocks: int, per_block: int) -> dict[str, float]:
    for action in actions.values():  # warm-up
        action()
    times = shared.alternate(actions, blocks, per_block)
    return {name: statistics.median(t["wall"]) * 1000 for name, t in times.items()}


def throughput_rows(base: nn.Module, inputs: dict[str, Tensor], labels: Tensor, args) -> list[dict]:
    rows = []
    for count in ADAPTER_COUNTS:
        model = adapted(base, count)
        model.eval()
        difference = check_equal(model, inputs, count)
        inference = timed_medians(inference_actions(model, inputs, count), args.blocks, args.per_block)
        training = timed_medians(training_actions(model, inputs, labels, count), args.blocks, args.per_block)
        rows.append({"adapters": count, "max_logit_difference": difference,
                     "inference_ms": inference, "training_ms": training})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- hot-swapping ------------------------------------------------------------------------------------------------
def saved_adapters(base: nn.Module, folder: Path) -> list[Path]:
    paths = []
    for index, (rank, alpha) in enumerate(SWAP_ADAPTERS):
        torch.manual_seed(200 + index)
        model = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=rank, alpha=alpha, targets=list(shared.TARGETS),
                                                            init="random"))
        paths.append(dt.save_adapter(model, folder / f"r{rank}"))
    return paths


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it (one per frame compile) and runs them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return graph.forward


def eager_logits(base: nn.Module, folder: Path, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return dt.load_adapter(copy.deepcopy(base), folder).eval()(**inputs)


def fresh_compiles(base: nn.Module, folders: list[Path], inputs: dict[str, Tensor]) -> dict:
    graphs, seconds, difference = [], [], 0.0
    for folder in folders:
        torch._dynamo.reset()
        backend = CountingBackend()
        start = time.perf_counter()
        model = dt.load_adapter(copy.deepcopy(base), folder).eval()
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            out = compiled(**inputs)
        seconds.append(time.perf_counter() - start)
        graphs.append(backend.graphs)
        difference = max(difference, float((out - eager_logits(base, folder, inputs)).abs().max()))
    return {"graphs": sum(graphs), "graphs_per_adapter": graphs, "seconds": seconds, "max_difference": difference}


def hot_swaps(base: nn.Module, folders: list[Path], inputs: dict[str, Tensor]) -> dict:
    torch._dynamo.reset()
    backend = CountingBackend()
    start = time.perf_counter()
    model = dt.load_adapter(copy.deepcopy(base), folders[0], "served").eval()
    dt.prepare_hotswap(model, "served", max_rank=max(rank for rank, _ in SWAP_ADAPTERS))
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(**inputs)
    seconds, first_call = [time.perf_counter() - start], backend.graphs
    difference = float((out - eager_logits(base, folders[0], inputs)).abs().max())
    for folder in folders[1:]:
        start = time.perf_counter()
        dt.hotswap_adapter(model, folder, "served")
        with torch.no_grad():
            out = compiled(**inputs)
        seconds.append(time.perf_counter() - start)
        difference = max(difference, float((out - eager_logits(base, folder, inputs)).abs().max()))
    torch._dynamo.reset()
    return {"graphs": backend.graphs, "recompiles": backend.graphs - first_call, "seconds": seconds,
            "max_difference": difference}


# --- single-adapter cost (routing unused) ------------------------------------------------------------------------
def single_step(base: nn.Module, inputs: dict[str, Tensor], labels: Tensor, args) -> dict:
    model = adapted(base, 1)
    dt.set_trainable(model, "a0")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=shared.LEARNING_RATE)

    def step() -> None:
        F.cross_entropy(model(**inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    return timed_medians({"train_step": step, "forward": forward}, args.blocks, args.per_block)


# --- the report --------------------------------------------------------------------------------------------------
def render(raw: dict) -> str:
    env = raw["environment"]
    lines = [f"# Mixed-adapter batches and hot-swapping (all-MiniLM-L6-v2, batch {shared.BATCH} × "
             f"{shared.MAX_TOKENS} tokens, LoRA r = {shared.RANK} on query+value)", "",
             harness.environment_line(env), "", f"Command: `{env['command']}`", "",
             "## One mixed batch vs the adapters one after another on their sub-batches", "",
             "| adapters | inference mixed (ms) | inference sequential (ms) | sequential / mixed "
             "| train step mixed (ms) | train step sequential (ms) | sequential / mixed "
             "| max \\|logit diff\\| mixed vs sequential |",
             "|---|---|---|---|---|---|---|---|"]
    for row in raw["throughput"]:
        inf, tr = row["inference_ms"], row["training_ms"]
        lines.append(f"| {row['adapters']} | {inf['mixed']:.1f} | {inf['sequential']:.1f} | "
                     f"{inf['sequential'] / inf['mixed']:.2f} | {tr['mixed']:.1f} | {tr['sequential']:.1f} | "
                     f"{tr['sequential'] / tr['mixed']:.2f} | {row['max_logit_difference']:.2e} |")
    lines += ["", f"Medians of {raw['timed_calls']} timed calls per contender (blocks of alternating order after one "
              "warm-up call). Training: mixed = one forward + backward + one AdamW step per adapter "
              "(`MultiAdapterTraining.step`); sequential = per adapter forward + backward + AdamW step on its "
              f"{shared.BATCH}/k samples. Base frozen in train mode (its dropout runs).", "",
              "## Hot-swapping under torch.compile (backend: a counting \"eager\" backend)", "",
              "| serving 3 adapters (r, alpha) = " + ", ".join(f"({r}, {a:g})" for r, a in SWAP_ADAPTERS)
              + " | graphs compiled | graphs compiled after the first call "
              "| seconds per adapter (load/swap + first call) | max \\|logit diff\\| vs eager fresh load |",
              "|---|---|---|---|---|"]
    for label, key in (("fresh load + torch.compile per adapter", "fresh"), ("prepare_hotswap(max_rank=16) + "
                                                                            "hotswap_adapter", "swap")):
        run = raw[key]
        seconds = ", ".join(f"{s:.2f}" for s in run["seconds"])
        recompiles = (f"every adapter compiles anew ({run['graphs_per_adapter']} graphs)" if key == "fresh"
                      else str(run["recompiles"]))
        lines.append(f"| {label} | {run['graphs']} | {recompiles} | {seconds} | {run['max_difference']:.2e} |")
    lines += ["", "Fresh: `torch._dynamo.reset()` before each adapter, so each compiles anew (the graphs a serving "
              "process would compile for each adapter without hot-swapping). Swap: one compile, then the ranks 8 and "
              "16 and alphas 16 and 4 are values written into the rank-16 zero-padded factors and the scale tensor.",
              "", "Raw numbers:", "", "```json", json.dumps({k: raw[k] for k in ("throughput", "fresh", "swap")},
                                                             indent=1), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=2)
    parser.add_argument("--single-step", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mixed_batches.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs, labels = shared.real_batch()
    base = shared.base_classifier()
    if args.single_step:
        print(json.dumps({"source": dt.__file__, **single_step(base, inputs, labels, args)}), flush=True)
        return
    raw = {"environment": harness.environment(threads=args.threads), "timed_calls": args.blocks * args.per_block}
    raw["throughput"] = throughput_rows(base, inputs, labels, args)
    with tempfile.TemporaryDirectory() as folder:
        folders = saved_adapters(base, Path(folder))
        raw["fresh"] = fresh_compiles(base, folders, inputs)
        raw["swap"] = hot_swaps(base, folders, inputs)
    print(json.dumps({"fresh": raw["fresh"], "swap": raw["swap"]}), flush=True)
    harness.write_report(args.output, render(raw))


if __name__ == "__main__":
    main()

"""PVP at small scale: prompts pre-trained on a source task as the init of the target's prompts (issue 13).

    flock /work/wt/heavy.lock python benchmarks/pvp.py [--out benchmarks/results/pvp] [--seeds 3]

The claim (other.md §5.2): initializing VPT's prompts from prompts trained on a source task beats random init at
1-4 shots per class, the gap shrinking with shots. Here: VPT-deep prompts trained on glyphs-vit (the 62-class
source task, a 2,000-image stratified subset, one run), then handwritten-vit at 1, 2, 4 images per class with
`init_from=` the source adapter (the head is the task's own; init_from reads only the prompt tensors) vs VPT's
random init, 3 seeds per shot count, one lr (1e-2: the VPT grid's middle; no per-arm tuning, which would need a
validation split the few-shot protocol does not have). Writes <out>.jsonl and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from deltatune.recipe import finetune

SOURCE, TARGET = "glyphs-vit", "handwritten-vit"
PARAMS = {"deep": True, "patch_fan_in": 16}
SHOTS, CLASSES, LR, EPOCHS, TEST = (1, 2, 4), 10, 1e-2, 20, 480


def pretrain_source(folder: Path) -> Path:
    if not (folder / "adapter").exists():
        finetune(SOURCE, "vpt", dict(PARAMS), epochs=2, lr=LR, train_size=2000, seed=0, progress=False,
                 out_dir=folder, validation_size=240, test_size=240)
    return folder / "adapter"


def run(shots: int, seed: int, init_from: Path | None) -> dict:
    started = time.perf_counter()
    result = finetune(TARGET, "vpt", dict(PARAMS), epochs=EPOCHS, lr=LR, train_size=shots * CLASSES, seed=seed,
                      progress=False, validation_size=240, test_size=TEST, init_from=init_from)
    return {"shots": shots, "seed": seed, "init": "source" if init_from else "random",
            "test": result.test_accuracy, "seconds": round(time.perf_counter() - started, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| shots/class | random init | PVP (source init) | gap | verdict |", "| --- | --- | --- | --- | --- |"]
    for shots in SHOTS:
        arms = {init: [r["test"] for r in rows if r["shots"] == shots and r["init"] == init]
                for init in ("random", "source")}
        random_mean, source_mean = statistics.mean(arms["random"]), statistics.mean(arms["source"])
        spread = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in arms.items()}
        verdict = "holds" if source_mean > random_mean else "does not hold"
        lines.append(f"| {shots} | {random_mean:.3f} ± {spread['random']:.3f} | {source_mean:.3f} ± "
                     f"{spread['source']:.3f} | {source_mean - random_mean:+.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/pvp")
    parser.add_argument("--work", default="runs/pvp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = pretrain_source(Path(args.work))
    out = Path(args.out)
    rows = []
    with open(out.with_suffix(".jsonl"), "w", encoding="utf-8") as handle:
        for shots in SHOTS:
            for seed in range(args.seeds):
                for init_from in (None, source):
                    rows.append(run(shots, seed, init_from))
                    handle.write(json.dumps(rows[-1]) + "\n")
                    handle.flush()
                    print(json.dumps(rows[-1]), flush=True)
    header = (f"# PVP: source-trained prompts as init, handwritten-vit few-shot\n\nCommand: `flock "
              f"/work/wt/heavy.lock python benchmarks/pvp.py` (torch {torch.__version__}, {args.threads} threads, "
              f"{time.strftime('%Y-%m-%d')}). Source: VPT-deep on {SOURCE}; target {TARGET}, {EPOCHS} epochs, lr "
              f"{LR}, test on {TEST} images; mean ± std over {args.seeds} seeds. Raw runs: pvp.jsonl.\n\n")
    out.with_suffix(".md").write_text(header + table(rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

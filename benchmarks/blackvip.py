"""BlackVIP (SPSA-GC) vs plain SPSA vs first-order VPT vs zero-shot on handwritten-vit, at equal queries (issue 13).

    flock /work/wt/heavy.lock python benchmarks/blackvip.py [--output benchmarks/results/blackvip] [--seeds 3]

The claims (other.md §8): BlackVIP (input-dependent prompts from a coordinator, trained by SPSA-GC through the
model's outputs only) beats zero-shot; SPSA-GC reaches a lower loss than plain SPSA in the same queries. Beside
them, first-order VPT-deep (white box: gradients through the model) at equal queries, to show what the black
box costs.

Task: handwritten-vit (scikit-learn digits in the glyph domain), 16 images per class (the paper's 16 shots),
drawn with the run's seed. Zero-shot is the frozen GlyphViT with its pretrained head's rows for '0'-'9': the
classes the head already has, so no head is trained by anyone and every arm shares that head (the black box
cannot train it; VPT trains its prompts only). Queries: one query = one example through the model's forward;
BlackVIP spends 2·S = 10 per example per step (S = 5 perturbations, two-sided), VPT 1 (its backward is not a
query a black box would answer; in compute it is about 2 more forwards, so the table also gives VPT's
forward-equivalents, 3 per example). Both train with batch 32; accuracy is read at fixed query checkpoints.
The setting (a, c for SPSA; lr for VPT) is the best seed-0 validation accuracy of one small grid (VPT: per
checkpoint; SPSA: at the final budget), then seeds 1.. run at every chosen setting; test mean ± std over seeds.
Resumable: <output>.jsonl holds finished runs (kept notes in the report survive a re-run).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import deltatune as dt
from deltatune.bench import harness
from deltatune.data.glyph_tasks import load_glyph_task
from deltatune.data.vision import load_glyph_cnn
from deltatune.optim.spsa_gc import SPSAGC
from deltatune.train.black_box import BlackBox
from deltatune.train.blackvip import (
    Coordinator,
    CoordinatorConfig,
    FrozenEncoder,
    evaluate,
    shuffled_batches,
    train_blackvip,
)

TASK, SHOTS, CLASSES, BATCH, PERTURBATIONS = "handwritten-vit", 16, 10, 32, 5
EPSILON = 0.25  # the paper's ε = 1 is in CLIP's normalized units (pixel range ≈ 3.7 wide); ours is [0, 1]
SPSA_STEPS = (10, 40, 150)  # checkpoints: 3,200 / 12,800 / 48,000 queries at 2·S·32 per step
VPT_STEPS = (100, 400)  # 3,200 / 12,800 queries at 32 per step
A_GRID, C_GRID, LR_GRID = (0.005, 0.01, 0.02), (0.0025, 0.005, 0.01), (3e-3, 1e-2, 3e-2)
# plain SPSA steps by a_k·ĝ, SPSA-GC by about a_k·ĝ/(1 − β) = 10·a_k·ĝ once m settles: its grid reaches 8x higher
SPSA_A_GRID = (0.005, 0.01, 0.02, 0.04, 0.08)
ARMS = ("spsa-gc", "spsa", "vpt")
KEYS = ("arm", "a", "c", "lr", "seed")


def task_for(seed: int):
    return load_glyph_task(TASK, train_size=SHOTS * CLASSES, seed=seed)


def splits(task) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (data.tensors["pixels"], data.tensors["labels"])
            for name, data in (("train", task.train), ("validation", task.validation), ("test", task.test))}


def zero_shot() -> dict:
    data = splits(task_for(0))
    box = BlackBox(task_for(0).model_factory(CLASSES))
    return {"arm": "zero-shot", "a": 0, "c": 0, "lr": 0, "seed": 0,
            "validation": evaluate(box, *data["validation"]), "test": evaluate(box, *data["test"])}


def run_spsa(job: dict) -> dict:
    task, started = task_for(job["seed"]), time.perf_counter()
    data = splits(task)
    box = BlackBox(task.model_factory(CLASSES), output="probabilities")
    torch.manual_seed(job["seed"])  # the decoder's init
    coordinator = Coordinator(FrozenEncoder(load_glyph_cnn(), "features"),
                              CoordinatorConfig(feature_dim=128, epsilon=EPSILON))
    optimizer = SPSAGC(coordinator.decoder.parameters(), a=job["a"], c=job["c"], perturbations=PERTURBATIONS,
                       correction=job["arm"] == "spsa-gc", seed=job["seed"])
    batches = shuffled_batches(*data["train"], BATCH, seed=job["seed"])
    curve, done, queries, losses = [], 0, 0, []
    for steps in SPSA_STEPS:
        result = train_blackvip(coordinator, box, batches, optimizer, steps - done)
        done, queries, losses = steps, queries + result.queries, losses + result.losses
        curve.append({"queries": queries, "train_loss": sum(losses[-10:]) / len(losses[-10:]),
                      "validation": evaluate(box, *data["validation"], coordinator),
                      "test": evaluate(box, *data["test"], coordinator)})
    return {**job, "curve": curve, "trainable": sum(p.numel() for p in coordinator.decoder.parameters()),
            "seconds": round(time.perf_counter() - started, 1)}


def _accuracy(model, pixels, labels) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(pixels).argmax(-1) == labels).float().mean())


def run_vpt(job: dict) -> dict:
    task, started = task_for(job["seed"]), time.perf_counter()
    data = splits(task)
    model = task.model_factory(CLASSES)
    torch.manual_seed(job["seed"])  # the prompts' init
    dt.adapt(model, dt.VPTConfig(deep=True, patch_fan_in=16))  # prompts only: the pretrained head stays frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job["lr"])
    batches = shuffled_batches(*data["train"], BATCH, seed=job["seed"])
    curve, done, queries = [], 0, 0
    for steps in VPT_STEPS:
        dt.set_training_mode(model)
        for _ in range(steps - done):
            pixels, labels = next(batches)
            loss = torch.nn.functional.cross_entropy(model(pixels), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            queries += pixels.shape[0]
        done = steps
        curve.append({"queries": queries, "train_loss": float(loss.detach()),
                      "validation": _accuracy(model, *data["validation"]), "test": _accuracy(model, *data["test"])})
    return {**job, "curve": curve, "trainable": sum(p.numel() for p in trainable),
            "seconds": round(time.perf_counter() - started, 1)}


def run(job: dict) -> dict:
    if job["arm"] == "zero-shot":
        return zero_shot()
    return run_vpt(job) if job["arm"] == "vpt" else run_spsa(job)


def grid(arm: str, c_for_spsa: float | None = None) -> list[dict]:
    if arm == "vpt":
        return [dict(arm=arm, a=0, c=0, lr=lr, seed=0) for lr in LR_GRID]
    if c_for_spsa is not None:
        return [dict(arm=arm, a=a, c=c_for_spsa, lr=0, seed=0) for a in SPSA_A_GRID]
    return [dict(arm=arm, a=a, c=c, lr=0, seed=0) for a in A_GRID for c in C_GRID]


def setting(record: dict) -> tuple:
    return record["a"], record["c"], record["lr"]


def chosen(records: list[dict], arm: str, checkpoint: int) -> tuple | None:
    """The setting with the best seed-0 validation accuracy at a checkpoint (ties: the smaller setting)."""
    tried = [r for r in records if r["arm"] == arm and r["seed"] == 0 and "curve" in r]
    if not tried:
        return None
    return setting(min(tried, key=lambda r: (-r["curve"][checkpoint]["validation"], setting(r))))


def checkpoints(arm: str) -> int:
    return len(VPT_STEPS if arm == "vpt" else SPSA_STEPS)


def chosen_for(records: list[dict], arm: str, checkpoint: int) -> tuple | None:
    """VPT: tuned per checkpoint. SPSA arms: tuned at the final budget (the claims' setting), the same run's
    earlier checkpoints shown (re-tuning 10-step prefixes would pick by noise and cost full runs per pick)."""
    return chosen(records, arm, checkpoint if arm == "vpt" else checkpoints(arm) - 1)


def seeded_jobs(records: list[dict], arm: str, seeds: int) -> list[dict]:
    settings = {chosen_for(records, arm, i) for i in range(checkpoints(arm))} - {None}
    return [dict(arm=arm, a=a, c=c, lr=lr, seed=seed) for a, c, lr in sorted(settings) for seed in range(1, seeds)]


def runs_at(records: list[dict], arm: str, chosen_setting: tuple, seeds: int) -> list[dict]:
    return [r for r in records if r["arm"] == arm and setting(r) == chosen_setting and r["seed"] < seeds]


def table(records: list[dict], seeds: int) -> tuple[str, dict]:
    lines = ["| arm | queries | forward-equivalents | setting (val.) | train loss | test % (mean ± std) | seeds |",
             "|---|---|---|---|---|---|---|"]
    zero = next((r for r in records if r["arm"] == "zero-shot"), None)
    zero_test = f"{100 * zero['test']:.1f}" if zero else "not run"
    lines.append(f"| zero-shot | 0 | 0 | – | – | {zero_test} | 1 (deterministic) |")
    means = {}
    for arm in ARMS:
        for i in range(checkpoints(arm)):
            best = chosen_for(records, arm, i)
            if best is None:
                continue
            rows = runs_at(records, arm, best, seeds)
            tests = [r["curve"][i]["test"] for r in rows]
            losses = [r["curve"][i]["train_loss"] for r in rows]
            queries = rows[0]["curve"][i]["queries"]
            means[arm, queries] = (sum(tests) / len(tests), sum(losses) / len(losses))
            label = f"lr {best[2]:g}" if arm == "vpt" else f"a {best[0]:g}, c {best[1]:g}"
            factor = 3 if arm == "vpt" else 1
            lines.append(f"| {arm} | {queries:,} | {factor * queries:,} | {label} | {means[arm, queries][1]:.3f} | "
                         f"{harness.mean_std(tests)} | {len(tests)} |")
    return "\n".join(lines) + "\n", {"zero": zero["test"] if zero else None, **means}


def verdicts(means: dict) -> str:
    final = BATCH * 2 * PERTURBATIONS * SPSA_STEPS[-1]
    lines = []
    if ("spsa-gc", final) in means and means["zero"] is not None:
        gc, plain = means["spsa-gc", final], means.get(("spsa", final))
        verdict = "holds" if gc[0] > means["zero"] else "does not hold"
        lines.append(f"- BlackVIP > zero-shot at {final:,} queries: {verdict} ({100 * gc[0]:.1f} vs "
                     f"{100 * means['zero']:.1f} % test).")
        if plain is not None:
            lines.append(f"- SPSA-GC reaches a lower training loss than plain SPSA at {final:,} queries: "
                         f"{'holds' if gc[1] < plain[1] else 'does not hold'} ({gc[1]:.3f} vs {plain[1]:.3f}; test "
                         f"{100 * gc[0]:.1f} vs {100 * plain[0]:.1f} %).")
    for steps in VPT_STEPS:
        queries = BATCH * steps
        if ("vpt", queries) in means and ("spsa-gc", queries) in means:
            lines.append(f"- At {queries:,} queries: first-order VPT {100 * means['vpt', queries][0]:.1f} % vs "
                         f"BlackVIP {100 * means['spsa-gc', queries][0]:.1f} %.")
    return "\n".join(lines) + "\n"


def render(records: list[dict], seeds: int, env: dict) -> str:
    body, means = table(records, seeds)
    decoder_size = next((f"{r['trainable']:,}" for r in records if r["arm"] == "spsa-gc"), "?")
    header = (f"# BlackVIP (SPSA-GC) vs SPSA vs VPT vs zero-shot, {TASK}, at equal queries\n\n"
              f"{harness.environment_line(env)}\n\nCommand: `{env['command']}`\n\n"
              f"{SHOTS} images per class (drawn with the run's seed), batch {BATCH}; BlackVIP: GlyphCNN features "
              f"(frozen) → decoder ({decoder_size} parameters), ε = {EPSILON}, S = "
              f"{PERTURBATIONS}, o 1, α 0.4, γ 0.1, β 0.9 (the paper's), a × c from {list(A_GRID)} × {list(C_GRID)} "
              f"(plain SPSA: a from {list(SPSA_A_GRID)} at SPSA-GC's chosen c); VPT-deep 5 tokens, AdamW lr from "
              f"{list(LR_GRID)}, the "
              f"pretrained head frozen. Settings chosen on validation (seed 0; VPT per checkpoint, SPSA at the final "
              f"budget), test mean ± std over seeds. Train loss: the mean of the last 10 steps' losses (SPSA: "
              f"over the 2·S perturbed queries). Raw runs: blackvip.jsonl.\n\n")
    return header + body + "\n" + verdicts(means)


def _done(records: list[dict], jobs: list[dict]) -> bool:
    return all(any(all(r[k] == job[k] for k in KEYS) for r in records) for job in jobs)


def complete(records: list[dict], seeds: int) -> bool:
    """Every grid run and every chosen setting's seeds are in the log."""
    final = chosen(records, "spsa-gc", checkpoints("spsa-gc") - 1)
    if final is None or not _done(records, [dict(arm="zero-shot", a=0, c=0, lr=0, seed=0)]):
        return False
    grids = grid("spsa-gc") + grid("vpt") + grid("spsa", final[1])
    return _done(records, grids) and all(_done(records, seeded_jobs(records, arm, seeds)) for arm in ARMS)


def run_all(log: harness.RunLog, seeds: int) -> None:
    """The most important comparisons first, so that a stopped run leaves them: BlackVIP and VPT, then SPSA."""
    harness.run_jobs([dict(arm="zero-shot", a=0, c=0, lr=0, seed=0)], log, run, describe=str)
    harness.run_jobs(grid("spsa-gc") + grid("vpt"), log, run, describe=str)
    for arm in ("spsa-gc", "vpt"):
        harness.run_jobs(seeded_jobs(log.records(), arm, seeds), log, run, describe=str)
    best_c = chosen(log.records(), "spsa-gc", checkpoints("spsa-gc") - 1)[1]
    harness.run_jobs(grid("spsa", best_c), log, run, describe=str)
    harness.run_jobs(seeded_jobs(log.records(), "spsa", seeds), log, run, describe=str)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/blackvip", help="writes <output>.md and .jsonl")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1: the models are tiny, and the CPU is shared")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs logged so far")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = harness.RunLog(f"{args.output}.jsonl", identity=KEYS)
    if not args.report_only:
        run_all(log, args.seeds)
    records = log.records()
    command = harness.command_line()
    if args.report_only:  # the runs were made by the command without the flag
        command = command.replace(" --report-only", "") + " (report re-rendered from the log with --report-only)"
    text = render(records, args.seeds, harness.environment(threads=args.threads, command=command))
    if not complete(records, args.seeds):
        text = text.replace("\n\n", f"\n\n**PARTIAL** (stopped before every run finished; resume with "
                            f"`flock /work/wt/heavy.lock python benchmarks/blackvip.py --seeds {args.seeds}`: "
                            "finished runs are kept)\n\n", 1)
    harness.write_report(f"{args.output}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

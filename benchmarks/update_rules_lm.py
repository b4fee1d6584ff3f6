"""LoRA-Pro on the causal LM: does it narrow LoRA's gap to full fine-tuning? (the WordNet-LM half of the claim
whose MiniLM half is in update_rules.md)

Model: the shipped WordNet-LM (Llama architecture, 5 blocks, hidden 256, 4.68M parameters, float32). Task:
`gloss-generation` (held-out lemma -> its definition; the loss is on the definition tokens only). Arms:
- full FT: every weight trained (the tied embeddings too), AdamW;
- LoRA + AdamW: LoRA r = 8, alpha 16 (s = 2, LoRA-Pro's paper and official code) on every Linear of the blocks
  (q, k, v, o, gate, up, down: 35 layers; `targets="all-linear"`, as sketchtune.md);
- LoRA + LoRA-Pro: the same LoRA, `update_rule="lora_pro"` with the paper's full-size Adam moments.
Recipe (sketchtune.md's shape, longer): AdamW-style step, weight decay 0, batch 16, STEPS steps, 10% linear warm-up
then linear decay, gradient clipping 1.0 (the Trainer's default). Each arm's rate is the lowest seed-0 validation
answer loss over one grid shared by every arm (GRID), extended along LADDER while the best rate sits at an edge
(up to MAX_EXTENSIONS times); seeds 1 and 2 then run at it. Metric: the held-out answer loss (token-mean
cross-entropy in nats on the definition tokens, `sketchtune.answer_loss`) on the 250 validation (tuning) and
250 test (reported) items; gloss-generation has no exact-match or accuracy metric (its generation metric,
MiniLM similarity, is not run here). The untrained base's loss is recorded too. Step time: median wall seconds
per optimizer step of each run (runs one after another on a shared machine: indicative, not side by side; the
side-by-side cost of the rules is update_rules.md's).

    nohup /work/wt/slot env PYTHONPATH=src .venv/bin/python benchmarks/update_rules_lm.py > lm.log 2>&1 &
    PYTHONPATH=src .venv/bin/python benchmarks/update_rules_lm.py --render     # the report from the JSONL
Resumable: finished runs are kept in benchmarks/results/update_rules_lm.jsonl; a re-run skips them.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.bench import harness  # noqa: E402
from deltatune.errors import ConfigError  # noqa: E402
from sketchtune import answer_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASK = "gloss-generation"
FULL = "full FT"
LORA_ARM, PRO_ARM = "LoRA + AdamW", "LoRA + LoRA-Pro"
ARMS = {FULL: ("full", "adamw"), LORA_ARM: ("lora", "adamw"), PRO_ARM: ("lora", "lora_pro")}
LORA = {"targets": "all-linear", "rank": 8, "alpha": 16.0}
RULE_OPTIONS = {"lora_pro": {"moments": "full"}}  # the paper's (and the default), named so the record says it
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the rates an extension may step to
GRID = LADDER[3:7]  # 3e-4 .. 1e-2 for every arm
MAX_EXTENSIONS = 3  # 2 left full FT at its edge, 3e-5: fully fine-tuning the LM wants the smallest rates
SEEDS = (0, 1, 2)
STEPS, BATCH, WARMUP_RATIO = 100, 16, 0.1
IDENTITY = ("part", "arm", "lr", "seed")


@dataclass
class Setup:
    """What a run needs: the splits, their collate, a fresh-model factory and the recipe length."""

    train: Any
    validation: Any
    test: Any
    collate: Callable
    build_model: Callable[[], torch.nn.Module]
    steps: int = STEPS


def gloss_setup(steps: int = STEPS) -> Setup:
    from deltatune.data import load_task

    task = load_task(TASK)
    return Setup(task.train, task.validation, task.test, task.collate, task.build_model, steps)


# --- one run ------------------------------------------------------------------------------------------------------
def arm_model(setup: Setup, arm: str, seed: int) -> torch.nn.Module:
    """A fresh pretrained LM for `arm`: fully trainable, or LoRA-adapted (its A drawn from `seed`)."""
    kind, _ = ARMS[arm]
    torch.manual_seed(seed)
    model = setup.build_model()
    if kind == "full":
        return model.requires_grad_(True)
    return dt.adapt(model, dt.config_for("lora", **LORA))


def train_run(setup: Setup, job: dict) -> dict:
    """One fine-tune of `job['arm']` at `job['lr']` with `job['seed']` (data order, LoRA init); its losses."""
    from deltatune.train import TrainConfig, Trainer

    _, rule = ARMS[job["arm"]]
    model = arm_model(setup, job["arm"], job["seed"])
    timer = harness.StepTimer()
    settings = TrainConfig(max_steps=setup.steps, batch_size=BATCH, lr=job["lr"], warmup_ratio=WARMUP_RATIO,
                           weight_decay=0.0, seed=job["seed"], progress=False, eval_every_epoch=False,
                           update_rule=rule, update_rule_options=RULE_OPTIONS.get(rule))
    result = Trainer(model, settings, setup.train, None, collate_fn=setup.collate, callbacks=[timer]).train()
    losses = [record["loss"] for record in result.history if "loss" in record]
    return {**job, "update_rule": rule, "steps": setup.steps, "trainable": dt.trainable_parameters(model).trainable,
            "validation_loss": answer_loss(model, setup.validation, setup.collate),
            "test_loss": answer_loss(model, setup.test, setup.collate),
            "final_train_loss": losses[-1] if losses else None,
            "median_step_seconds": statistics.median(timer.seconds[2:] or timer.seconds)}


def base_run(setup: Setup, job: dict) -> dict:
    """The untrained LM's losses: where every arm starts."""
    model = setup.build_model()
    return {**job, "validation_loss": answer_loss(model, setup.validation, setup.collate),
            "test_loss": answer_loss(model, setup.test, setup.collate)}


def run(setup: Setup, job: dict) -> dict:
    return base_run(setup, job) if job["part"] == "base" else train_run(setup, job)


# --- rate selection -----------------------------------------------------------------------------------------------
def tuning_losses(records: Sequence[dict], arm: str) -> dict[float, float]:
    """Seed 0's validation loss at every rate tried for `arm`."""
    return {r["lr"]: r["validation_loss"] for r in records
            if r.get("part") == "finetune" and r["arm"] == arm and r["seed"] == SEEDS[0]}


def best_rate(records: Sequence[dict], arm: str) -> float | None:
    """The rate with the lowest seed-0 validation loss (ties to the smaller rate); None before any ran. A rate
    whose run diverged (a non-finite loss) never wins."""
    losses = tuning_losses(records, arm)
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    return min(finite, key=lambda lr: (finite[lr], lr)) if finite else None


def next_rate(records: Sequence[dict], arm: str) -> float | None:
    """The LADDER neighbour past the edge where the best rate sits, at most MAX_EXTENSIONS past GRID; or None
    when the best rate is inside the rates tried (or the grid has not finished)."""
    tried = sorted(tuning_losses(records, arm))
    best = best_rate(records, arm)
    if best is None or not set(GRID) <= set(tried):
        return None
    index, low, high = LADDER.index(best), LADDER.index(GRID[0]), LADDER.index(GRID[-1])
    if best == tried[0] and index > max(0, low - MAX_EXTENSIONS):
        return LADDER[index - 1]
    if best == tried[-1] and index < min(len(LADDER) - 1, high + MAX_EXTENSIONS):
        return LADDER[index + 1]
    return None


def at_edge(records: Sequence[dict], arm: str) -> bool:
    tried = sorted(tuning_losses(records, arm))
    return bool(tried) and best_rate(records, arm) in (tried[0], tried[-1])


def finetune_job(arm: str, lr: float, seed: int) -> dict:
    return {"part": "finetune", "arm": arm, "lr": lr, "seed": seed}


def run_all(log: harness.RunLog, setup: Setup, arms: Sequence[str], env: dict | None = None) -> None:
    """The base, then per arm: the grid on seed 0, its extensions, then the other seeds at the chosen rate; each
    record carries `env` (where and how it ran) when given."""
    def execute(job: dict) -> dict:
        return {**run(setup, job), **({"environment": env} if env else {})}

    def describe(job: dict) -> str:
        return f"{job['part']} {job['arm']} lr={job['lr']:g} seed={job['seed']}"

    harness.run_jobs([{"part": "base", "arm": "base", "lr": 0.0, "seed": 0}], log, execute, describe=describe)
    for arm in arms:
        harness.run_jobs([finetune_job(arm, lr, SEEDS[0]) for lr in GRID], log, execute, describe=describe)
        while (following := next_rate(log.records(), arm)) is not None:
            harness.run_jobs([finetune_job(arm, following, SEEDS[0])], log, execute, describe=describe)
        chosen = best_rate(log.records(), arm)
        harness.run_jobs([finetune_job(arm, chosen, seed) for seed in SEEDS[1:]], log, execute, describe=describe)


# --- the report ---------------------------------------------------------------------------------------------------
def chosen_runs(records: Sequence[dict], arm: str) -> list[dict]:
    best = best_rate(records, arm)
    return [r for r in records if r.get("part") == "finetune" and r["arm"] == arm and r["lr"] == best]


def loss_text(values: Sequence[float]) -> str:
    return harness.mean_std(values, scale=1.0, digits=4)


def difference(records: Sequence[dict], arm: str, other: str) -> tuple[float, float] | None:
    """(mean test loss of `arm` − that of `other` at their chosen rates, its standard error from the seeds'
    spreads), or None before both have 2 seeds. Negative: `arm` is better."""
    mine = [r["test_loss"] for r in chosen_runs(records, arm)]
    theirs = [r["test_loss"] for r in chosen_runs(records, other)]
    if len(mine) < 2 or len(theirs) < 2:
        return None
    error = math.sqrt(statistics.variance(mine) / len(mine) + statistics.variance(theirs) / len(theirs))
    return statistics.mean(mine) - statistics.mean(theirs), error


def gap_to_full(records: Sequence[dict], arm: str) -> tuple[float, float] | None:
    """`arm`'s test loss − full FT's (> 0: full FT is better, the gap the claim wants narrowed)."""
    return difference(records, arm, FULL)


def claim_line(records: Sequence[dict]) -> str:
    """The two differences the claim rests on: full FT must lead LoRA (a gap exists), and LoRA-Pro must improve
    on LoRA (the gap narrows from LoRA's side, not because full FT or LoRA-Pro got worse)."""
    lead, change = difference(records, FULL, LORA_ARM), difference(records, PRO_ARM, LORA_ARM)
    if lead is None or change is None:
        return "The claim's differences: not every arm has its seeds yet."
    return (f"Full FT − LoRA: {lead[0]:+.4f} ± {lead[1]:.4f} nats; LoRA-Pro − LoRA: {change[0]:+.4f} ± "
            f"{change[1]:.4f} nats (test loss, ± one standard error over 3 seeds each; negative = better than "
            "LoRA + AdamW). The claim needs both negative: full FT ahead of LoRA, and LoRA-Pro moving toward it.")


def results_table(records: Sequence[dict]) -> list[str]:
    lines = ["| arm | update rule | trainable | lr (edge?) | seeds | validation loss | test loss | "
             "test gap to full FT (± s.e.) | median step s |", "|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in records if r.get("part") == "base"), None)
    if base:
        lines.append(f"| base (untrained) | – | – | – | – | {base['validation_loss']:.4f} | {base['test_loss']:.4f} "
                     f"| – | – |")
    for arm in ARMS:
        rows = chosen_runs(records, arm)
        if not rows:
            lines.append(f"| {arm} | {ARMS[arm][1]} | – | not run | – | – | – | – | – |")
            continue
        gap = gap_to_full(records, arm) if arm != FULL else None
        edge = " (edge)" if at_edge(records, arm) else ""
        lines.append(f"| {arm} | {ARMS[arm][1]} | {rows[0]['trainable']:,} | {rows[0]['lr']:g}{edge} | {len(rows)} | "
                     f"{loss_text([r['validation_loss'] for r in rows])} | {loss_text([r['test_loss'] for r in rows])}"
                     f" | {f'{gap[0]:+.4f} ± {gap[1]:.4f}' if gap else '–'} | "
                     f"{statistics.median(r['median_step_seconds'] for r in rows):.3f} |")
    return lines


def grid_table(records: Sequence[dict]) -> list[str]:
    rates = sorted({r["lr"] for r in records if r.get("part") == "finetune"})
    lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for arm in ARMS:
        cells = {r["lr"]: f"{r['validation_loss']:.4f} ({r['test_loss']:.4f})" for r in records
                 if r.get("part") == "finetune" and r["arm"] == arm and r["seed"] == SEEDS[0]}
        lines.append(f"| {arm} | " + " | ".join(cells.get(lr, "–") for lr in rates) + " |")
    return lines


def complete(records: Sequence[dict]) -> bool:
    return all(len(chosen_runs(records, arm)) == len(SEEDS) and next_rate(records, arm) is None for arm in ARMS)


def report(records: Sequence[dict]) -> str:
    env = next((r["environment"] for r in records if r.get("environment")), harness.environment(threads=1))
    steps = next((r["steps"] for r in records if "steps" in r), STEPS)
    status = [] if complete(records) else ["**PARTIAL**: not every run finished; re-run the command to resume "
                                           "(finished runs are kept).", ""]
    return "\n".join([
        "# Update rules on the causal LM: LoRA-Pro vs LoRA vs full fine-tuning (WordNet-LM, gloss-generation)", "",
        harness.environment_line(env), "", f"Command: `{env['command']}` (re-render: `--render`)", "", *status,
        f"Protocol: {steps} steps of batch {BATCH} ({steps * BATCH:,} of the 2,376 training items), "
        f"{WARMUP_RATIO:.0%} warm-up then linear decay, clipping 1.0, weight decay 0; LoRA r = {LORA['rank']}, "
        f"alpha {LORA['alpha']:g} on all 35 block Linears; grid {list(GRID)} for every arm on seed 0's validation "
        f"answer loss, extended along {list(LADDER)} while the best is at an edge (at most {MAX_EXTENSIONS} "
        f"steps past the grid), seeds {list(SEEDS)} at the chosen rate. Loss: nats per definition token "
        "(lower is better), 250 validation / 250 test items.", "",
        "## Held-out answer loss at each arm's chosen rate (mean ± std over seeds)", "", *results_table(records), "",
        claim_line(records), "", "## Seed 0 at every rate: validation loss (test loss)", "", *grid_table(records), "",
        "Raw runs: update_rules_lm.jsonl (one run a line). Step times come from runs made one after another on a "
        "shared machine (indicative; update_rules.md has the side-by-side cost of the rules).", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, default=RESULTS / "update_rules_lm.jsonl")
    parser.add_argument("--output", type=Path, default=RESULTS / "update_rules_lm.md")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--arms", nargs="*", default=list(ARMS), help="a subset of the arms, in run order")
    parser.add_argument("--render", action="store_true", help="only re-write the report from the JSONL")
    args = parser.parse_args()
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown:
        raise ConfigError(f"arm(s) {unknown} are unknown: expected names from {list(ARMS)}")
    torch.set_num_threads(1)
    log = harness.RunLog(args.log, IDENTITY)
    if not args.render:
        other = sorted({r["steps"] for r in log.records() if "steps" in r} - {args.steps})
        if other:
            raise ConfigError(f"{args.log} holds runs of {other} steps, not --steps {args.steps}: a rate tuned at "
                              "one length is not tuned at another; pass --log with a new file or the same --steps")
        try:
            run_all(log, gloss_setup(args.steps), args.arms, harness.environment(threads=1))
        finally:  # a stopped run still reports what finished
            harness.write_report(args.output, report(log.records()))
    text = report(log.records())
    harness.write_report(args.output, text)
    print(text)


if __name__ == "__main__":
    main()

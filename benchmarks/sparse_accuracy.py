"""Selective methods side by side on the embedded default task, and how far each moves the base model.

Task: `wordnet-nouns` (WordNet noun glosses -> 10 lexicographer classes), all-MiniLM-L6-v2 + mean pooling + a
Linear head (trained by every method). To fit the machine (2 shared cores), training uses a fixed
label-stratified 1,000-example subset of the training split (drawn with seed 0 for every run), 2 epochs, batch 32
(64 steps), AdamW without weight decay, linear decay, gradient clipping 1.0 (the deltatune Trainer's defaults);
the loss includes each method's regularizer (SaRA's nuclear norm) and each method's trainer callbacks run
(SaRA's schedule, ID³'s unmasking, SNELLA's allocation).

Every method adapts the same 36 encoder Linear layers with the same budget: 331,776 trainable entries, LoRA's
count at rank 8 on those layers (3.125% of their weights). SaRA: the smallest-|w| 3.125% of each weight; SPT: the
global top-3.125% by Taylor sensitivity (8 batches) with LoRA (rank 8) where a matrix is sensitive enough;
ID³: 3.125% unmasked step by step (weight form); SNELLA: rank 8 (2 kernels of width 4), target sparsity 0.3,
allocation every 8 steps; BitFit: the same layers' biases (its count cannot be matched).

Learning rate: tuned per method on seed 0 over the same grid for every method, on a fixed 500-example validation
subset; then seeds 0, 1, 2 (head init and data order) at the chosen rate, reported as mean ± std on the full test
split (2,000). Last, every other seed-0 grid run that learned (validation ≥ 50%) is tested too, reloading its
adapter: the accuracy/drift trade-off along the grid, so methods can be compared at equal accuracy.

Drift of the base model (the SaRA paper's claim that it keeps more of the pretrained ability than LoRA), measured
on the trained backbone with the head removed:
- probe: a linear probe (multinomial logistic regression on frozen mean-pooled features, 1,000 train / 1,000 test
  examples of a second task, `wordnet-verbs`) — its accuracy minus the same probe's on the untouched base model;
- similarity: 500 held-out glosses of a third task (`wordnet-adj` test split): the correlation between the
  pairwise cosine similarities of their embeddings before and after fine-tuning (1 = the geometry is unchanged),
  and the mean cosine between each gloss's embedding before and after.

Each run is a fresh child process (`--workers` at a time); finished runs are appended to the JSONL file, so an
interrupted benchmark resumes where it stopped (the loop is deltatune.bench.harness's). Trained adapters are kept
in `--work-dir` (default: in the system's temporary folder): the test/drift run of seed 0 reloads the tuning
run's adapter instead of training again. `--render` only re-writes the report from the JSONL file.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparse_accuracy.py --workers 2 \\
        --jsonl benchmarks/results/sparse_accuracy.jsonl --output benchmarks/results/sparse_accuracy.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparse_accuracy.py --render \\
        --jsonl benchmarks/results/sparse_accuracy.jsonl --output benchmarks/results/sparse_accuracy.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402

TASK, PROBE_TASK, SIMILARITY_TASK = "wordnet-nouns", "wordnet-verbs", "wordnet-adj"
TRAIN_SIZE, VALIDATION_SIZE, EPOCHS, BATCH = 1000, 500, 2, 32
PROBE_SIZE, SIMILARITY_SIZE = 1000, 500
if os.environ.get("SPARSE_ACCURACY_SMOKE"):  # a few-minute end-to-end check of the script itself
    TRAIN_SIZE, VALIDATION_SIZE, EPOCHS, PROBE_SIZE, SIMILARITY_SIZE = 64, 64, 1, 100, 50
SHARE = 0.03125  # = LoRA rank 8 on the 36 encoder Linear layers of MiniLM
METHODS = ("lora", "sara", "spt", "id3", "snella", "bitfit")
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # 1e-2 and 3e-2 added: SaRA and BitFit peaked at the grid's top
SEEDS = (0, 1, 2)
LEARNED = 0.5  # validation accuracy (10 classes) above which a grid run counts as trained, not diverged
PLOT_FLOOR = 0.75  # grid runs below this test accuracy are in the table, not the plot (they would squash it)


# --- data and model -------------------------------------------------------------------------------------------
def task_data():
    from deltatune.data import load_task
    from deltatune.data.sampling import stratified_subset

    task = load_task(TASK, train_size=TRAIN_SIZE, seed=0)
    validation = task.validation.subset(stratified_subset(task.validation.labels.tolist(), VALIDATION_SIZE, 0))
    return task, validation


def target_paths(model: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name.startswith("backbone.encoder"))


def method_config(method: str, model: nn.Module, task, seed: int):
    """The method's config on the shared targets and budget (SPT: planned from 8 training batches)."""
    import deltatune as dt

    paths, head = target_paths(model), ("classifier",)
    common = dict(targets=paths, extra_trainable=head)
    if method == "lora":
        return dt.LoRAConfig(rank=8, alpha=8.0, **common)
    if method == "sara":
        return dt.config_for("sara", fraction=SHARE, **common)
    if method == "id3":
        return dt.config_for("id3", budget=SHARE, **common)
    if method == "snella":
        return dt.config_for("snella", rank=8, heads=2, allocation_interval=8, **common)
    if method == "bitfit":
        return dt.config_for("bitfit", **common)
    if method == "spt":
        from deltatune.methods.spt import SPTConfig, plan_spt

        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(task.train), generator=generator).tolist()
        count = min(8, len(order) // BATCH)
        batches = [task.collate([task.train[i] for i in order[b * BATCH:(b + 1) * BATCH]]) for b in range(count)]
        return plan_spt(model, SPTConfig(budget=SHARE, lora_rank=8, **common), batches)
    raise ValueError(method)


# --- one run ---------------------------------------------------------------------------------------------------
def run(job: dict, work_dir: Path) -> dict:
    """Train (or reload the adapter of an earlier run of the same method, lr and seed) and evaluate."""
    import deltatune as dt
    from deltatune.data import evaluate_accuracy

    task, validation = task_data()
    torch.manual_seed(job["seed"])
    model = task.build_model()
    adapter = work_dir / f"{job['method']}-lr{job['lr']:g}-seed{job['seed']}"
    if (adapter / "deltatune_config.json").exists():
        dt.load_adapter(model, adapter)
        result = json.loads((adapter / "run.json").read_text())
    else:
        result = train(job, model, task)
        result["validation"] = evaluate_accuracy(model, validation)
        dt.save_adapter(model, adapter)
        (adapter / "run.json").write_text(json.dumps(result))
    if job["test"]:
        result["test"] = evaluate_accuracy(model, task.test)
        result |= drift(model.backbone, pooled_embeddings_source())
    return result


def train(job: dict, model: nn.Module, task) -> dict:
    import deltatune as dt
    from deltatune.train import TrainConfig, Trainer

    config = method_config(job["method"], model, task, job["seed"])
    dt.adapt(model, config)
    steps = EPOCHS * math.ceil(len(task.train) / BATCH)
    train_config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=job["lr"], seed=job["seed"], progress=False,
                               eval_every_epoch=False, log_every=10**6)
    callbacks = config.training_callbacks(model, steps)
    trainer = Trainer(model, train_config, task.train, collate_fn=task.collate, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    trainable = dt.trainable_parameters(model).trainable
    unmasking = [c for c in callbacks if hasattr(c, "unmasked")]
    if unmasking:  # ID³: the dense update is a parameter, but only the unmasked entries ever train
        trainable += unmasking[0].unmasked() - sum(p.numel() for _, _, d in dt.iter_deltas(model)
                                                   for p in d.parameters())
    return {"method": job["method"], "lr": job["lr"], "seed": job["seed"], "seconds": time.perf_counter() - start,
            "trainable": trainable}


def pooled_embeddings_source() -> nn.Module:
    from deltatune.data.models import load_minilm_backbone

    return load_minilm_backbone()


def embed(backbone: nn.Module, dataset, batch_size: int = 128) -> Tensor:
    from deltatune.data.models import masked_mean

    was_training = backbone.training
    backbone.eval()
    parts = []
    with torch.no_grad():
        for batch in dataset.batches(batch_size):
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            parts.append(masked_mean(hidden, batch["attention_mask"]))
    backbone.train(was_training)
    return torch.cat(parts)


def drift_datasets():
    from deltatune.data import load_task
    from deltatune.data.sampling import stratified_subset

    probe = load_task(PROBE_TASK)
    probe_train = probe.train.subset(stratified_subset(probe.train.labels.tolist(), PROBE_SIZE, 0))
    probe_test = probe.test.subset(stratified_subset(probe.test.labels.tolist(), PROBE_SIZE, 0))
    glosses = load_task(SIMILARITY_TASK).test
    glosses = glosses.subset(stratified_subset(glosses.labels.tolist(), SIMILARITY_SIZE, 0))
    return probe_train, probe_test, glosses


def probe_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor) -> float:
    """Multinomial logistic regression (L-BFGS, small L2, standardized features), deterministic."""
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    classes = int(train_labels.max()) + 1
    weight = torch.zeros(x_train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x_train @ weight + bias, train_labels) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(((x_test @ weight + bias).argmax(1) == test_labels).float().mean())


def geometry(base: Tensor, tuned: Tensor) -> dict[str, float]:
    def pairwise(e: Tensor) -> Tensor:
        n = F.normalize(e, dim=1)
        sims = n @ n.T
        return sims[torch.triu_indices(len(e), len(e), 1).unbind()]

    a, b = pairwise(base), pairwise(tuned)
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return {"similarity_correlation": correlation, "self_cosine": float(F.cosine_similarity(base, tuned).mean())}


def drift(backbone: nn.Module, reference: nn.Module) -> dict[str, float]:
    probe_train, probe_test, glosses = drift_datasets()
    tuned = {name: embed(backbone, d) for name, d in (("train", probe_train), ("test", probe_test), ("g", glosses))}
    base = {name: embed(reference, d) for name, d in (("train", probe_train), ("test", probe_test), ("g", glosses))}
    tuned_probe = probe_accuracy(tuned["train"], probe_train.labels, tuned["test"], probe_test.labels)
    base_probe = probe_accuracy(base["train"], probe_train.labels, base["test"], probe_test.labels)
    return {"probe": tuned_probe, "base_probe": base_probe, "probe_change": tuned_probe - base_probe,
            **geometry(base["g"], tuned["g"])}


# --- driver ----------------------------------------------------------------------------------------------------
def plan(done: list[dict]) -> list[dict]:
    """Runs still to do: the lr grid on seed 0 (validation only), then the chosen lr on every seed (test + drift),
    then test + drift of every other seed-0 grid run that learned (the accuracy/drift trade-off along the grid;
    these only reload adapters)."""
    have = {(r["method"], r["lr"], r["seed"], "test" in r) for r in done}
    todo = [dict(method=m, lr=lr, seed=0, test=False) for m, lr in itertools.product(METHODS, LR_GRID)
            if (m, lr, 0, False) not in have and (m, lr, 0, True) not in have]
    if todo:
        return todo
    best = chosen_rates(done)
    todo = [dict(method=m, lr=best[m], seed=s, test=True) for m in METHODS for s in SEEDS
            if (m, best[m], s, True) not in have]
    if todo:
        return todo
    return [dict(method=r["method"], lr=r["lr"], seed=0, test=True) for r in done
            if r["seed"] == 0 and "test" not in r and r["validation"] >= LEARNED
            and (r["method"], r["lr"], 0, True) not in have]


def chosen_rates(done: list[dict]) -> dict[str, float]:
    tuning = [r for r in done if r["seed"] == 0]
    best = {}
    for method in METHODS:
        rows = sorted((r for r in tuning if r["method"] == method), key=lambda r: (-r["validation"], r["lr"]))
        best[method] = rows[0]["lr"]
    return best


def run_identity(job_or_record: dict) -> list | None:
    """A run is (method, lr, seed, tested or not): a job says `test: True/False`; its record holds a test
    accuracy only when it was tested (the layout of the committed JSONL file)."""
    if not all(key in job_or_record for key in ("method", "lr", "seed")):
        return None
    return [job_or_record["method"], job_or_record["lr"], job_or_record["seed"],
            job_or_record.get("test", False) is not False]


def launch(job: dict, threads: int, work_dir: Path) -> dict:
    command = harness.script_command(__file__, "--run", json.dumps(job), "--threads", str(threads),
                                     "--work-dir", str(work_dir))
    result = harness.run_child(command, label=f"run {job}")
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jsonl", type=Path, default=Path("benchmarks/results/sparse_accuracy.jsonl"))
    parser.add_argument("--output", type=Path)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sparse_accuracy_runs",
                        help="trained adapters (reused by the test runs of seed 0)")
    parser.add_argument("--render", action="store_true", help="only re-write the report from the JSONL file")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        harness.emit(run(json.loads(args.run), args.work_dir))
        return
    log = harness.RunLog(args.jsonl, identity=run_identity)
    while not args.render and (todo := plan(log.records())):
        harness.run_jobs(todo, log, lambda job: launch(job, args.threads, args.work_dir), workers=args.workers)
    done = log.records()
    report = render(done, args)
    print(report)
    if args.output:
        figure = plot_accuracy_vs_drift(final_runs(done), grid_runs(done))
        harness.write_report(args.output, report, {args.output.with_suffix(".png"): figure})


def final_runs(done: list[dict]) -> dict[str, list[dict]]:
    """Each method's test runs at its chosen learning rate."""
    best = chosen_rates(done)
    return {m: [r for r in done if r["method"] == m and r["lr"] == best[m] and "test" in r] for m in METHODS}


def grid_runs(done: list[dict]) -> dict[str, list[dict]]:
    """Each method's seed-0 test runs across the lr grid, by increasing lr (one row per lr)."""
    rows = {m: {r["lr"]: r for r in done if r["method"] == m and r["seed"] == 0 and "test" in r} for m in METHODS}
    return {m: [by_lr[lr] for lr in sorted(by_lr)] for m, by_lr in rows.items()}


DRIFT_AXES = (("similarity_correlation", 1, "similarity correlation with the base model (1 = unchanged geometry)"),
              ("probe_change", 100, f"frozen-probe accuracy change on {PROBE_TASK} (points)"))


def _spread(values: list[float]) -> float:
    """The sample standard deviation (0 for a single value), for error bars."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot_accuracy_vs_drift(finals: dict[str, list[dict]], grid: dict[str, list[dict]]):
    """Test accuracy against the two drift measures: per method its chosen lr (mean over seeds, ±1 std bars) and,
    dashed, its seed-0 runs along the lr grid that reach PLOT_FLOOR (the trade-off a different lr would give)."""
    plt = harness.pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for axis, (key, scale, label) in zip(axes, DRIFT_AXES):
        for method, rows in finals.items():
            if not rows:
                continue
            x, y = [r[key] * scale for r in rows], [r["test"] * 100 for r in rows]
            axis.errorbar(statistics.mean(x), statistics.mean(y), xerr=_spread(x), yerr=_spread(y), fmt="o",
                          capsize=3, color=colors[method], label=method)
            curve = [r for r in grid.get(method, []) if r["test"] >= PLOT_FLOOR]
            if len(curve) > 1:
                axis.plot([r[key] * scale for r in curve], [r["test"] * 100 for r in curve], "--.",
                          color=colors[method], alpha=0.5, linewidth=1)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy on {TASK} (%)")
    axes[1].legend(loc="lower right")
    figure.suptitle("Selective methods: accuracy vs how far the backbone moved "
                    f"(points: chosen lr, 3 seeds; dashed: seed 0 along the lr grid, runs ≥ {PLOT_FLOOR:.0%})")
    figure.tight_layout()
    return figure


def sara_versus_lora(finals: dict[str, list[dict]]) -> list[str]:
    """The SaRA paper's claim, checked: does SaRA move the backbone less than LoRA? A difference counts when it
    exceeds two standard errors of the difference of the means over seeds."""
    sara, lora = finals.get("sara", []), finals.get("lora", [])
    if len(sara) < 2 or len(lora) < 2:
        return []
    lines = ["", "SaRA vs LoRA (the paper: SaRA keeps more of the base model), at the chosen rates:"]
    for key, scale, label, keeps_more in (("similarity_correlation", 1, "similarity correlation", "higher"),
                                          ("probe_change", 100, "probe Δ (points)", "higher"),
                                          ("self_cosine", 1, "self-cosine", "higher")):
        a, b = [r[key] * scale for r in sara], [r[key] * scale for r in lora]
        difference = statistics.mean(a) - statistics.mean(b)
        error = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        if abs(difference) <= 2 * error:
            verdict = "within noise"
        else:
            verdict = "SaRA keeps more" if (difference > 0) == (keeps_more == "higher") else "SaRA moves it more"
        lines.append(f"- {label}: SaRA {statistics.mean(a):.3f} vs LoRA {statistics.mean(b):.3f}, difference "
                     f"{difference:+.3f} (2 s.e. = {2 * error:.3f}): {verdict}")
    return lines


def render(done: list[dict], args: argparse.Namespace) -> str:
    best = chosen_rates(done)
    finals = final_runs(done)
    env = harness.environment(threads=args.threads)
    lines = [
        "# Selective methods on wordnet-nouns (all-MiniLM-L6-v2): accuracy and base-model drift", "",
        f"{env['date'][:10]}, torch {env['torch']}, Python {env['python']}, {env['cores']} cores (shared), "
        f"{env['threads']} thread(s) per run, {args.workers} runs at a time, deltatune at {env['commit']}.", "",
        f"Command: `{env['command']}`", "",
        f"Train: {TRAIN_SIZE} examples (fixed stratified subset), {EPOCHS} epochs, batch {BATCH}; lr grid "
        f"{list(LR_GRID)} tuned on seed 0 on {VALIDATION_SIZE} validation examples; test = full test split; "
        f"seeds {list(SEEDS)}. Accuracies in %, mean ± std over seeds.", "",
        "| method | trainable | lr | validation | test | probe Δ (verbs) | similarity corr. | self-cosine | "
        "seconds / run |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        rows = finals[method]
        if not rows:
            continue
        lines.append(
            f"| {method} | {rows[0]['trainable']:,} | {best[method]:g} | "
            f"{mean_std([r['validation'] for r in rows])} | {mean_std([r['test'] for r in rows])} | "
            f"{mean_std([r['probe_change'] for r in rows], digits=2)} | "
            f"{mean_std([r['similarity_correlation'] for r in rows], scale=1, digits=3)} | "
            f"{mean_std([r['self_cosine'] for r in rows], scale=1, digits=3)} | "
            f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    lines += sara_versus_lora(finals)
    base = next((r["base_probe"] for r in done if "base_probe" in r), None)
    if base is not None:
        lines += ["", f"Base model probe accuracy on {PROBE_TASK}: {100 * base:.1f}% (probe Δ is relative to it)."]
    lines += ["", "## Learning-rate grid (seed 0, validation accuracy %)", "",
              "| method | " + " | ".join(f"{lr:g}" for lr in LR_GRID) + " |", "| --- |" + " ---: |" * len(LR_GRID)]
    for method in METHODS:
        cells = []
        for lr in LR_GRID:
            row = next((r for r in done if r["method"] == method and r["lr"] == lr and r["seed"] == 0), None)
            cells.append(f"{100 * row['validation']:.1f}" if row else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    grid = grid_runs(done)
    if any(len(rows) > 1 for rows in grid.values()):
        lines += ["", "## Accuracy and drift along the lr grid (seed 0, runs that learned)", "",
                  "A larger step moves the backbone further; compare methods at equal accuracy, not only at "
                  "their best lr.", "",
                  "| method | lr | test | probe Δ (verbs) | similarity corr. | self-cosine |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for method, rows in grid.items():
            lines += [f"| {method} | {r['lr']:g} | {100 * r['test']:.1f} | {100 * r['probe_change']:+.2f} | "
                      f"{r['similarity_correlation']:.3f} | {r['self_cosine']:.3f} |" for r in rows]
    lines += ["", "Accuracy against drift: sparse_accuracy.png next to this file.",
              "Raw numbers: sparse_accuracy.jsonl next to this file (one line per run).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Model Surgery on all-MiniLM-L6-v2: move a behaviour with a probe-guided edit of 4.65% of the MLP input rows.

Behaviour (a real binary attribute, offline): "the sentence is a verb definition" — WordNet 3.0 glosses from
the built-in `wordnet-pos` task, verb (1) vs noun (0) definitions. Steps, as in the paper:
1. probe: logistic regression (deltatune.merging.editing.surgery.train_probe, l2 = 1e-2) on the frozen model's
   last-layer hidden states mean-pooled over non-padding tokens, 2,000 training glosses (1,000 verbs, 1,000 nouns);
2. selection: the 4.65% (paper's 16,384 / (32 x 11,008)) of all `intermediate.dense` rows (6 x 1,536, each a
   vector in hidden space; BERT has no gate_proj) with the most negative cosine to the probe weight;
3. edit: row += alpha * direction.

Measured on held-out glosses, each edited model against the unedited one:
- behaviour: an independent **judge** (sklearn LogisticRegression fitted on the unedited model's features of
  the 500 validation glosses) gives P(verb); we report its mean on 300 test verb glosses and on 300 test noun
  glosses, and the probe's own mean P(verb) on the 600;
- another task: `wordnet-nouns` (10 classes of noun definitions), a LogisticRegression head fitted on the
  unedited features of 2,000 training glosses, accuracy on 1,000 test glosses with the edited model's features
  (the head is not refitted), and the mean cosine between edited and unedited sentence embeddings.
Rules compared: the paper's (most negative cosine, +alpha), the same rows with -alpha, the most positively
aligned rows with +/-alpha, and k random rows with +alpha (a control). alpha is in units of the mean norm of
the candidate rows along the *unit* probe direction (the paper adds the raw probe weight, whose scale depends
on how the probe was trained); the raw equivalent is printed.

Results: the raw numbers go to `--json` (default benchmarks/results/model_surgery.json), the table to `--out`;
`--render` re-writes the table from the JSON without running anything.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/model_surgery_demo.py
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/model_surgery_demo.py --render
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from deltatune.bench import harness
from deltatune.data import load_minilm, load_task
from deltatune.merging.editing import surgery
from deltatune.merging.editing.surgery import RowSelection, SurgeryConfig

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_ALPHAS = "0.25,0.5,1.0"
NOUN, VERB = 0, 1  # wordnet-pos label indices
RULES = {  # name -> (alignment or "random", sign of alpha)
    "paper: most negative cos, +alpha": ("negative", 1.0),
    "most negative cos, -alpha": ("negative", -1.0),
    "most positive cos, +alpha": ("positive", 1.0),
    "most positive cos, -alpha": ("positive", -1.0),
    "random rows, +alpha (control)": ("random", 1.0),
}


def pos_subset(split, per_class: int) -> tuple[list[int], torch.Tensor]:
    """The first `per_class` noun and verb glosses of a wordnet-pos split (the split order is fixed)."""
    labels = split.labels.tolist()
    nouns = [i for i, label in enumerate(labels) if label == NOUN][:per_class]
    verbs = [i for i, label in enumerate(labels) if label == VERB][:per_class]
    indices = nouns + verbs
    return indices, torch.tensor([1 if labels[i] == VERB else 0 for i in indices])


def features(model, split, indices) -> torch.Tensor:
    return surgery.mean_pooled_hidden_states(model, split.subset(indices).batches(128)).double()


def random_selection(weights: dict, count: int, seed: int) -> RowSelection:
    names = list(weights)
    sizes = [weights[name].shape[0] for name in names]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(sum(sizes), generator=generator)[:count].tolist()
    starts = np.cumsum([0] + sizes[:-1])
    entries = []
    for flat in picks:
        owner = int(np.searchsorted(starts, flat, side="right") - 1)
        entries.append((names[owner], flat - int(starts[owner]), float("nan")))
    return RowSelection(tuple(entries))


def select(model, direction: torch.Tensor, rule: str, count: int) -> RowSelection:
    weights = {name: weight.detach() for name, weight in surgery.row_weights(model).items()}
    alignment, _ = RULES[rule]
    if alignment == "random":
        return random_selection(weights, count, seed=0)
    return surgery.select_parameters(weights, direction, count, alignment)


def edited_copy(model, selection: RowSelection, step: torch.Tensor):
    edited = copy.deepcopy(model)
    surgery.apply_surgery(surgery.row_weights(edited), selection, step, 1.0, in_place=True)
    return edited


def evaluate(model, bench: dict) -> dict:
    behaviour = features(model, bench["pos_test"], bench["pos_indices"])
    nouns = features(model, bench["nouns_test"], bench["nouns_indices"])
    judged = bench["judge"].predict_proba(behaviour.numpy())[:, 1]
    verbs = bench["pos_labels"].numpy() == 1
    return {
        "judge_verbs": float(judged[verbs].mean()), "judge_nouns": float(judged[~verbs].mean()),
        "probe_score": float(bench["probe"].probabilities(behaviour).mean()),
        "nouns_accuracy": float((bench["head"].predict(nouns.numpy()) == bench["nouns_labels"]).mean()),
        "embedding_cosine": float(torch.nn.functional.cosine_similarity(nouns, bench["nouns_base"]).mean()),
    }


def prepare(model, scale: int = 1) -> dict:
    """Probe, judge and nouns head on the unedited model; `scale` > 1 divides every set (a quick smoke run)."""
    pos, nouns_task = load_task("wordnet-pos"), load_task("wordnet-nouns")
    train_indices, train_labels = pos_subset(pos.train, 1000 // scale)
    probe = surgery.train_probe(features(model, pos.train, train_indices), train_labels, l2=1e-2)
    val_indices, val_labels = pos_subset(pos.validation, 250 // scale)
    judge = LogisticRegression(max_iter=5000).fit(features(model, pos.validation, val_indices).numpy(),
                                                  val_labels.numpy())
    test_indices, test_labels = pos_subset(pos.test, 300 // scale)
    nouns_train = list(range(0, len(nouns_task.train), 2 * scale))  # every other gloss: 2,000, 200 per class
    head = LogisticRegression(max_iter=5000).fit(features(model, nouns_task.train, nouns_train).numpy(),
                                                 nouns_task.train.labels[nouns_train].numpy())
    nouns_indices = list(range(0, len(nouns_task.test), 2 * scale))  # 1,000, 100 per class
    bench = {"probe": probe, "judge": judge, "head": head, "pos_test": pos.test, "pos_indices": test_indices,
             "pos_labels": test_labels, "nouns_test": nouns_task.test, "nouns_indices": nouns_indices,
             "nouns_labels": nouns_task.test.labels[nouns_indices].numpy()}
    bench["nouns_base"] = features(model, nouns_task.test, nouns_indices)
    bench["probe_test_accuracy"] = bench["probe"].accuracy(features(model, pos.test, test_indices), test_labels)
    return bench


def row_line(row: dict, base: dict) -> str:
    result = row["result"]
    return (f"| {row['rule']} | {row['alpha']:+.2f} | {row['raw_alpha']:+.3f} | {result['judge_verbs']:.3f} | "
            f"{result['judge_nouns']:.3f} | {result['probe_score']:.3f} | {100 * result['nouns_accuracy']:.1f} "
            f"({100 * (result['nouns_accuracy'] - base['nouns_accuracy']):+.1f}) | {result['embedding_cosine']:.4f} |")


def measure(alphas: list[float], scale: int) -> dict:
    """Probe, select, edit and evaluate every rule x alpha; the raw numbers of the report."""
    start = time.perf_counter()
    model, _ = load_minilm()
    model.eval()
    bench = prepare(model, scale)
    base = evaluate(model, bench)
    weights = surgery.row_weights(model)
    candidates = sum(w.shape[0] for w in weights.values())
    count = SurgeryConfig().row_count(candidates)
    row_norm = float(torch.cat([w.detach().norm(dim=1) for w in weights.values()]).mean())
    probe_norm = float(bench["probe"].weight.norm())
    unit = bench["probe"].unit_direction.float()
    print(f"base {base}; {count}/{candidates} rows; mean row norm {row_norm:.3f}; |w| {probe_norm:.3f}", flush=True)
    rows = []
    for rule, (_, sign) in RULES.items():
        selection = select(model, unit, rule, count)
        for alpha in alphas:
            step = sign * alpha * row_norm * unit
            rows.append({"rule": rule, "alpha": sign * alpha, "raw_alpha": sign * alpha * row_norm / probe_norm,
                         "result": evaluate(edited_copy(model, selection, step), bench)})
            print(row_line(rows[-1], base), flush=True)
    return {"base": base, "rows": rows, "count": count, "candidates": candidates, "row_norm": row_norm,
            "probe_norm": probe_norm, "probe_test_accuracy": bench["probe_test_accuracy"],
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", default=DEFAULT_ALPHAS)
    parser.add_argument("--scale", type=int, default=1, help="divide every data set by this (smoke runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_surgery.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "model_surgery.json")
    parser.add_argument("--render", action="store_true", help="only re-write --out from the --json file")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    if arguments.render:
        raw = json.loads(arguments.json.read_text())
    else:
        torch.manual_seed(0)
        raw = {"environment": harness.environment(threads=1), "alphas": arguments.alphas, "scale": arguments.scale,
               **measure([float(a) for a in arguments.alphas.split(",")], arguments.scale)}
        harness.write_json(arguments.json, raw)
    harness.write_report(arguments.out, report(raw))  # keeps the hand-written reading of a previous run


def report(raw: dict) -> str:
    """The Markdown report of the raw numbers (`measure` plus the environment)."""
    base, env = raw["base"], raw["environment"]
    header = ("| rule | alpha (row-norm units) | alpha on raw w | judge P(verb), verb glosses | judge P(verb), "
              "noun glosses | probe mean P(verb) | nouns acc % (change) | cos(edited, base) embedding |")
    text = [
        "# Model Surgery on all-MiniLM-L6-v2 (behaviour: verb-definition-ness of WordNet glosses)", "",
        "- command: `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python benchmarks/model_surgery_demo.py"
        + (f" --alphas {raw['alphas']}" if raw["alphas"] != DEFAULT_ALPHAS else "")
        + (f" --scale {raw['scale']}" if raw["scale"] != 1 else "") + "`",
        f"- environment: {harness.environment_line(env)} Wall {raw['seconds']:.0f} s",
        "- setup: see the docstring of benchmarks/model_surgery_demo.py. Probe: logistic regression (l2 1e-2) on "
        "last-layer mean-pooled states of 1,000 verb + 1,000 noun glosses (wordnet-pos train); its accuracy on "
        f"the 600 test glosses: {100 * raw['probe_test_accuracy']:.1f}%. Edited rows: {raw['count']} of "
        f"{raw['candidates']} `intermediate.dense` rows (4.65%, the paper's fraction); mean row norm "
        f"{raw['row_norm']:.3f}, probe |w| {raw['probe_norm']:.3f}.",
        "", "## Unedited model", "",
        f"judge P(verb): verb glosses {base['judge_verbs']:.3f}, noun glosses {base['judge_nouns']:.3f}; probe mean "
        f"P(verb) {base['probe_score']:.3f}; wordnet-nouns accuracy {100 * base['nouns_accuracy']:.1f}% "
        "(1,000 test glosses, LogisticRegression head on frozen features).", "",
        "## Edited models", "", header, "|---" * 8 + "|", *(row_line(row, base) for row in raw["rows"]), "",
    ]
    return "\n".join(text)


if __name__ == "__main__":
    main()

"""benchmarks/update_rules_lm.py: the rate each arm is tuned to (with edge extension), the gap arithmetic of its
claim against hand computation, and two real WordNet-LM steps of every arm."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "update_rules_lm.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling sketchtune.py, as when run
    try:
        spec = importlib.util.spec_from_file_location("update_rules_lm_script", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def run(arm, lr, seed, validation, test=None, trainable=10):
    return {"part": "finetune", "arm": arm, "lr": lr, "seed": seed, "validation_loss": validation,
            "test_loss": validation if test is None else test, "trainable": trainable, "median_step_seconds": 0.5,
            "steps": 100}


def grid(bench, arm, losses):
    return [run(arm, lr, 0, loss) for lr, loss in zip(bench.GRID, losses)]


def test_the_lowest_validation_loss_wins_and_a_diverged_rate_never_does(bench):
    records = grid(bench, "full FT", [3.0, 2.0, 2.0, float("nan")])
    assert bench.best_rate(records, "full FT") == bench.GRID[1]  # a tie goes to the smaller rate
    assert bench.best_rate(records, "LoRA + AdamW") is None


def test_an_edge_is_extended_along_the_ladder_at_most_twice_past_the_grid(bench):
    records = grid(bench, "full FT", [1.0, 2.0, 3.0, 4.0])  # best at the bottom edge, 3e-4
    assert bench.next_rate(records, "full FT") == pytest.approx(1e-4)
    records.append(run("full FT", 1e-4, 0, 0.5))
    assert bench.next_rate(records, "full FT") == pytest.approx(3e-5)
    records.append(run("full FT", 3e-5, 0, 0.4))
    assert bench.next_rate(records, "full FT") == pytest.approx(1e-5)
    records.append(run("full FT", 1e-5, 0, 0.3))
    assert bench.next_rate(records, "full FT") is None and bench.at_edge(records, "full FT")  # three past: stop
    inside = grid(bench, "LoRA + AdamW", [3.0, 1.0, 2.0, 4.0])
    assert bench.next_rate(inside, "LoRA + AdamW") is None and not bench.at_edge(inside, "LoRA + AdamW")
    assert bench.next_rate(grid(bench, "LoRA + AdamW", [4.0, 3.0, 2.0, 1.0]), "LoRA + AdamW") == pytest.approx(3e-2)
    assert bench.next_rate(grid(bench, "LoRA + AdamW", [1.0, 2.0]), "LoRA + AdamW") is None  # grid not done


def test_the_gaps_and_the_claims_differences_match_hand_computation(bench):
    records = (grid(bench, "full FT", [9, 1.0, 9, 9]) + [run("full FT", 1e-3, s, 1.0, 3.0 + d) for s, d in
                                                           ((1, 0.1), (2, -0.1))]
               + grid(bench, "LoRA + AdamW", [9, 9, 1.0, 9])
               + [run("LoRA + AdamW", 3e-3, s, 1.0, t) for s, t in ((1, 3.6), (2, 3.8))]
               + grid(bench, "LoRA + LoRA-Pro", [9, 9, 1.0, 9])
               + [run("LoRA + LoRA-Pro", 3e-3, s, 1.0, t) for s, t in ((1, 3.3), (2, 3.5))])
    # chosen runs' test losses: full FT [1.0 (seed 0), 3.1, 2.9], LoRA [1.0, 3.6, 3.8], LoRA-Pro [1.0, 3.3, 3.5]
    gap, error = bench.gap_to_full(records, "LoRA + AdamW")
    assert gap == pytest.approx((1.0 + 3.6 + 3.8) / 3 - (1.0 + 3.1 + 2.9) / 3)
    lora_var = sum((x - 2.8) ** 2 for x in (1.0, 3.6, 3.8)) / 2
    full_var = sum((x - 7.0 / 3) ** 2 for x in (1.0, 3.1, 2.9)) / 2
    assert error == pytest.approx(math.sqrt(lora_var / 3 + full_var / 3))
    change, _ = bench.difference(records, "LoRA + LoRA-Pro", "LoRA + AdamW")
    assert change == pytest.approx(-0.2)  # (7.8 - 8.4) / 3: LoRA-Pro is 0.2 nats better than LoRA
    text = bench.report(records)
    assert "PARTIAL" not in text and "LoRA-Pro − LoRA: -0.2000 ±" in text and "Full FT − LoRA: -0.4667 ±" in text
    assert "(edge)" not in text


def test_an_unfinished_log_is_reported_as_partial(bench):
    text = bench.report(grid(bench, "full FT", [1.0, 2.0, 3.0, 4.0]))
    assert "PARTIAL" in text and "| LoRA + LoRA-Pro | lora_pro | – | not run |" in text


def test_two_real_steps_of_each_lora_arm_on_wordnet_lm(bench):
    from deltatune.data import load_task

    task = load_task("gloss-generation")
    setup = bench.Setup(task.train.subset(range(32)), task.validation.subset(range(8)), task.test.subset(range(8)),
                        task.collate, task.build_model, steps=2)
    full = bench.arm_model(setup, "full FT", 0)
    assert all(p.requires_grad for p in full.parameters())  # full FT trains everything, the tied embeddings too
    base = bench.run(setup, {"part": "base", "arm": "base", "lr": 0.0, "seed": 0})
    records = {arm: bench.run(setup, bench.finetune_job(arm, 3e-3, 0)) for arm in ("LoRA + AdamW", "LoRA + LoRA-Pro")}
    lora_count = 5 * 8 * (512 + 384 + 384 + 512 + 3 * 944)  # blocks × rank × (in + out) of q, k, v, o, gate, up, down
    assert records["LoRA + AdamW"]["trainable"] == records["LoRA + LoRA-Pro"]["trainable"] == lora_count
    assert records["LoRA + LoRA-Pro"]["update_rule"] == "lora_pro"
    losses = {arm: r["validation_loss"] for arm, r in records.items()}
    assert all(math.isfinite(v) and v != base["validation_loss"] for v in losses.values())
    assert losses["LoRA + AdamW"] != losses["LoRA + LoRA-Pro"]  # the rule changed the update, not only its name

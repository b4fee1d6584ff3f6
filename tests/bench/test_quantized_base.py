"""benchmarks/quantized_base.py's causal-LM part at toy size (1 training step, 8 test items), so the path that went
unrun once cannot rot again: every base builds and trains, the stored bytes are QLoRA's, the merge-back records
are coherent, the step-time alternation runs, and the report renders each base."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling benchmarks (additive_cost, sketchtune)
    try:
        spec = importlib.util.spec_from_file_location("quantized_base_script", BENCHMARKS / "quantized_base.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("quantized_base_script", None)


@pytest.fixture(scope="module")
def lm_and_task():
    from deltatune.data import load_task
    from deltatune.data.wordnet_lm import load_wordnet_lm

    model, _ = load_wordnet_lm()
    task = load_task("gloss-generation")
    return model, SimpleNamespace(train=task.train, validation=torch.utils.data.Subset(task.validation, range(8)),
                                  test=torch.utils.data.Subset(task.test, range(8)), collate=task.collate)


@pytest.fixture
def toy(bench, monkeypatch):
    monkeypatch.setattr(bench, "LM_STEPS", 1)
    monkeypatch.setattr(bench, "LM_BATCH", 4)
    monkeypatch.setattr(bench, "WARMUP", 0)
    monkeypatch.setattr(bench, "STEPS", 1)
    monkeypatch.setattr(bench, "ROUNDS", 1)
    return bench


def test_the_lm_targets_are_the_35_block_linears_and_lora_starts_at_the_base_output(toy, lm_and_task):
    model, task = lm_and_task
    adapted, memory, originals = toy.lm_adapted(model, "nf4", 0)
    assert len(originals) == 35 and memory.layers == 35
    assert memory.parameters == sum(w.numel() for w in originals.values()) == 3_624_960
    # NF4 + double quantization: QLoRA §3's 4.127 bits per weight
    assert 8 * memory.stored_bytes / memory.parameters == pytest.approx(4.127, abs=5e-4)
    fp32, _, _ = toy.lm_adapted(model, "fp32", 0)
    # LoRA's B starts at zero: the adapted fp32 LM is the shipped LM
    assert toy.answer_loss(fp32, task.test, task.collate) == pytest.approx(
        toy.answer_loss(model, task.test, task.collate), abs=1e-9)
    assert all(torch.equal(w, model.get_submodule(p).weight) for p, w in originals.items())  # input untouched


@pytest.mark.parametrize("base", ["fp32", "bf16", "int8", "nf4"])
def test_one_lm_run_per_base_records_what_the_report_reads(toy, lm_and_task, base):
    model, task = lm_and_task
    record = toy.lm_run(model, task, base, 0)
    assert record["base_weights"] == 3_624_960
    bits = 8 * record["base_bytes"] / record["base_weights"]
    # int8: one float32 scale per output row on top of the 8-bit codes (rows of 256 or 688 inputs)
    expected = {"fp32": (32, 32), "bf16": (16, 16), "int8": (8.04, 8.13), "nf4": (4.126, 4.128)}[base]
    assert expected[0] <= bits <= expected[1]
    assert 3.0 < record["test_loss"] < 5.0  # the shipped LM's answer loss is ~3.95 nats
    if base in ("fp32", "bf16"):
        assert "merge" not in record
        return
    assert 0 <= record["merge"]["relative_frobenius"] < 0.2
    # requantizing the fp32 weights + ΔW carries ΔW through (on average): the share kept is near 1
    assert record["merge_from_original"]["delta_kept"] == pytest.approx(1.0, abs=0.1)
    assert 3.0 < record["merged_test_loss"] < 5.0 and 3.0 < record["merged_from_original_test_loss"] < 5.0


def test_the_static_part_orders_the_bases_by_their_rounding_and_bf16_is_the_checkpoint(toy, lm_and_task):
    model, task = lm_and_task
    static = toy.lm_static(model, task)
    errors = [static[base]["weight_relative_frobenius"] for base in ("bf16", "int8", "nf4")]
    # the shipped LM is stored in bfloat16: rounding it to bfloat16 changes nothing (why bf16 runs one seed)
    assert errors[0] == 0.0 and static["bf16"]["test_loss"] == static["fp32"]["test_loss"]
    assert 0 < errors[1] < errors[2] < 0.2
    assert static["nf4"]["test_loss"] != static["fp32"]["test_loss"]


def test_the_lm_step_time_alternation_and_the_report(toy, lm_and_task):
    model, task = lm_and_task
    records = toy.lm_timing(model, task)
    assert [r["kind"] for r in records] == ["lm_timing", "lm_saved_bytes"]
    assert records[0]["ratio_to_fp32"]["fp32"] == 1.0
    saved = records[1]["bytes"]
    assert saved["nf4"] < saved["fp32"]  # no float copy of the quantized weights is kept for backward
    runs = [{"kind": "lm", "base": base, "seed": 0, "lr": 3e-3, "test_loss": 3.9, "base_weights": 100,
             "base_bytes": {"fp32": 400, "bf16": 200}[base]} for base in ("fp32", "bf16")]
    text = "\n".join(toy.render_lm(runs + records))
    assert "| fp32 | 400 | 1.000 | 32.000 | 3.9000 (n=1) | +0.0000 |" in text
    assert "| bf16 | 200 | 0.500 | 16.000 |" in text
    assert "nf4 × fp32" in text and "lm_saved" not in text


def test_the_rate_check_records_both_losses_and_the_report_bolds_the_best_validation_loss(toy, lm_and_task):
    model, task = lm_and_task
    record = toy.lm_rate_check(model, task, "nf4", 1e-3)
    assert record["kind"] == "lm_rate" and 3.0 < record["validation_loss"] < 5.0 and 3.0 < record["test_loss"] < 5.0
    rates = [{"kind": "lm_rate", "base": "nf4", "lr": lr, "validation_loss": v, "test_loss": 4.0}
             for lr, v in ((1e-3, 3.99), (3e-3, 3.98), (1e-2, 4.01))]
    text = "\n".join(toy.render_lm_rates(rates))
    assert "| nf4 | 3.9900 / 4.0000 | **3.9800** / 4.0000 | 4.0100 / 4.0000 |" in text

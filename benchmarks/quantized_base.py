"""LoRA on a 32-bit, a 16-bit, an 8-bit and a 4-bit (NF4) frozen base: accuracy, base memory, step time, merge-back.

QLoRA's claim (Dettmers et al., 2023, §4-5): a 4-bit NormalFloat base with LoRA on top matches a 16-bit base with
LoRA. Task: `wordnet-nouns` (WordNet noun glosses -> 10 lexicographer classes), all-MiniLM-L6-v2 + mean pooling +
a Linear head. Every Linear of the encoder (36 layers: query, key, value, attention output, intermediate, output
of the 6 blocks) is the base that changes; embeddings, LayerNorms and the head stay float32. Bases:

- `fp32`: the checkpoint as it is;
- `bf16`: those weights rounded to bfloat16 (computed in float32): the 16-bit base of QLoRA's comparison, as a
  weight precision (a CPU bfloat16 matmul would only change the speed);
- `int8`: `deltatune.quantize_base(bits=8)`, per-output-row absmax (LLM.int8's vector-wise weight quantization
  without its outlier decomposition);
- `nf4`: `deltatune.quantize_base(bits=4)`, NF4, blocksize 64, double-quantized constants (QLoRA's defaults).

LoRA rank 8, alpha 8, on the same 36 Linears (QLoRA puts LoRA on every linear layer of the blocks: with fewer
it did not match 16-bit), the head trained. Training: sparse_accuracy.md's recipe exactly — a fixed
label-stratified 1,000-example subset of the train split (seed 0), 2 epochs, batch 32 (64 steps), AdamW, linear
decay, clipping 1.0 (the deltatune Trainer's defaults), max length 32 — so its learning rate applies: 3e-3, tuned
there ONCE on the fp32 base for LoRA r8 on these 36 layers (grid 3e-4 .. 3e-2, seed 0, 500 validation examples),
and reused here for every base: the question is whether a quantized base needs anything the float one does not.
Seeds 0, 1, 2 (head and LoRA init, data order) per base; test accuracy on the full test split (2,000).

Merge-back, on every trained quantized model: `deltatune.merge_quantized` (dequantize, add ΔW, requantize with
the layer's settings) reports the error it adds against the float merge and the share of ΔW the stored weight
keeps, and the merged model's test accuracy is measured; so is the variant that requantizes the fp32 checkpoint's
W + ΔW (`original_weights=`), and the float merge (`dequantize_base` then `unload(merge=True)`, exact; seed 0).

Step time: one process builds the fp32, int8 and nf4 adapted models (bf16 runs fp32's computation), and their whole
training steps (forward, backward, AdamW step, zero_grad) alternate on one real batch, 2 warm-up steps dropped,
median of 10, ratio to fp32's median in the same round; 2 rounds. Memory: the stored bytes of the 36 base weights
(`deltatune.base_memory`: codes plus constants) against float32 / bfloat16, and the bytes autograd saves for
backward in one forward (each storage once), which shows whether a float copy of each weight is kept.

The causal LM (`--part lm`): the shipped WordNet-LM (Llama, 5 blocks) on `gloss-generation`, its 35 block Linears
(q, k, v, o, gate, up, down) as the base in the same four precisions, LoRA r8 on the same 35 (the tied head and the
embeddings stay float32), sketchtune.md's LoRA recipe (40 steps, batch 16, 10% warm-up, lr 3e-3 tuned there on the
fp32 LM, reused for every base as above); metric: the test answer loss (nats/token on the definition tokens, 250
items); seeds 0, 1, 2 (bf16: seed 0 only, a check: the shipped LM is stored in bfloat16, so its fp32 and bf16 bases
are the same weights); the same merge-back measurements, an untuned-base loss per precision, the same step-time
alternation (batch 16), and a re-check of the rate: fp32 and nf4 at 1e-3, 3e-3, 1e-2 (seed 0, validation loss).

    /work/wt/slot env PYTHONPATH=src python benchmarks/quantized_base.py --threads 1 [--part minilm|lm]
        [--stop-at HH:MM]   # a run in the JSONL is not repeated
    python benchmarks/quantized_base.py --render                                      # the report from the JSONL
QUANTIZED_BASE_SMOKE=1 runs a seconds-long version (write it elsewhere: --output /tmp/...).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from additive_cost import loss_of, saved_for_backward_bytes  # noqa: E402
from deltatune.bench import harness  # noqa: E402
from deltatune.bench.harness import mean_std  # noqa: E402
from deltatune.core.host import AdaptedLayer  # noqa: E402
from sketchtune import answer_loss  # noqa: E402

TASK, TRAIN_SIZE, VALIDATION_SIZE, TEST_SIZE, EPOCHS, BATCH, MAX_LENGTH = "wordnet-nouns", 1000, 500, None, 2, 32, 32
BASES = ("fp32", "bf16", "int8", "nf4")
RUN_ORDER = ("fp32", "nf4", "bf16", "int8")
LR = 3e-3  # sparse_accuracy.md: LoRA r8 on the 36 encoder Linears, this recipe, tuned on the fp32 base
SEEDS = (0, 1, 2)
# every Linear of the 6 blocks (a regex matching containers too would be refused); not the head
ENCODER = (r"backbone\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
           r"|intermediate\.dense|output\.dense)")
WARMUP, STEPS, ROUNDS = 2, 10, 2
# WordNet-LM: every Linear of the 5 blocks; LoRA r8 all-linear at 40 steps, batch 16, lr 3e-3 — the rate tuned for
# exactly this recipe on the fp32 LM in sketchtune.md (grid 3e-5 .. 1e-2, validation loss), reused here
LM_BLOCKS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
LM_STEPS, LM_LR = 40, 3e-3
# the shipped WordNet-LM is stored in bfloat16 (data/README.md): its fp32 and bf16 bases are the same weights, so the
# bf16 arm runs one seed, as a check that it equals fp32's run, and the slot time goes to the quantized arms
LM_SEEDS = {"fp32": SEEDS, "nf4": SEEDS, "int8": SEEDS, "bf16": SEEDS[:1]}
# does the NF4 base want another rate? sketchtune.md's grid around its choice, seed 0, fp32 and nf4 side by side
LM_RATE_GRID = (1e-3, 3e-3, 1e-2)
if os.environ.get("QUANTIZED_BASE_SMOKE"):  # a seconds-long end-to-end check of the script itself
    TRAIN_SIZE, VALIDATION_SIZE, TEST_SIZE, EPOCHS, SEEDS, STEPS = 32, 32, 32, 1, (0,), 1
    LM_STEPS = 2


# --- one base --------------------------------------------------------------------------------------------------
def build(task, base: str, seed: int):
    """The task model with `base` applied to its encoder Linears, LoRA r8 on the same Linears; and the base's
    memory."""
    torch.manual_seed(seed)
    model = task.build_model()
    build.originals = {p: m.weight.detach().clone() for p, m in model.named_modules() if re.fullmatch(ENCODER, p)}
    memory = apply_base(model, base)
    dt.adapt(model, dt.LoRAConfig(rank=8, alpha=8.0, targets=ENCODER, extra_trainable=("classifier",)))
    return model, memory


def apply_base(model, base: str, targets: str = ENCODER):
    """Turn the Linears of `model` that `targets` matches into `base`, in place; the BaseMemory of a quantized
    base, else None."""
    if base in ("int8", "nf4", "nf4-no-dq"):
        return dt.quantize_base(model, bits=8 if base == "int8" else 4, targets=targets,
                                double_quant=base != "nf4-no-dq")
    if base == "bf16":
        with torch.no_grad():
            for path, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and re.fullmatch(targets, path):
                    module.weight.copy_(module.weight.bfloat16().float())
    return None


# --- the causal LM -------------------------------------------------------------------------------------------
LM_BATCH = 16


def lm_adapted(model, base: str, seed: int):
    """A copy of WordNet-LM with `base` applied to its 35 block Linears and LoRA r8 on every Linear but the (tied)
    head (the same 35; sketchtune.md's LoRA r8, the same seeding); its BaseMemory (None for a float base) and the
    fp32 weights of those Linears (for `merge_quantized(original_weights=)`)."""
    originals = {p: m.weight.detach().clone() for p, m in model.named_modules() if re.fullmatch(LM_BLOCKS, p)}
    model = copy.deepcopy(model)
    memory = apply_base(model, base, LM_BLOCKS)
    torch.manual_seed(seed)  # LoRA's A
    dt.adapt(model, dt.config_for("lora", rank=8, targets="all-linear"))
    return model, memory, originals


def lm_loss_of(model, batch: dict) -> torch.Tensor:
    """The causal LM's own loss on the answer tokens (labels -100 elsewhere; the model shifts them)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def lm_block_weights(model) -> int:
    return sum(m.in_features * m.out_features for p, m in model.named_modules()
               if re.fullmatch(LM_BLOCKS, p.replace(".base_layer", "")) and not isinstance(m, AdaptedLayer))


def lm_trained(model, task, base: str, seed: int, lr: float):
    """(the trained LM, its BaseMemory, the fp32 block weights, training seconds): sketchtune.md's recipe at `lr`."""
    from deltatune.train import TrainConfig, Trainer

    model, memory, originals = lm_adapted(model, base, seed)
    settings = TrainConfig(max_steps=LM_STEPS, batch_size=LM_BATCH, lr=lr, warmup_ratio=0.1, seed=seed,
                           progress=False, eval_every_epoch=False, log_every=5)
    start = time.perf_counter()
    Trainer(model, settings, task.train, None, collate_fn=task.collate).train()
    return model, memory, originals, time.perf_counter() - start


def lm_run(model, task, base: str, seed: int) -> dict:
    """LoRA r8 on the `base` version of WordNet-LM's blocks, sketchtune.md's recipe; held-out answer loss before
    and after merge-back (dequantize-add-requantize, and requantizing the fp32 W + ΔW)."""
    model, memory, originals, seconds = lm_trained(model, task, base, seed, LM_LR)
    weights = lm_block_weights(model)
    record = {"kind": "lm", "base": base, "seed": seed, "lr": LM_LR, "train_seconds": seconds,
              "test_loss": answer_loss(model, task.test, task.collate),
              "base_weights": weights,
              "base_bytes": memory.stored_bytes if memory else weights * (2 if base == "bf16" else 4)}
    if memory is not None:
        from_original = copy.deepcopy(model)
        report = dt.merge_quantized(model)
        record["merge"] = {"relative_frobenius": report.relative_frobenius, "max_abs": report.max_abs,
                           "delta_relative_frobenius": report.delta_relative_frobenius,
                           "delta_kept": report.delta_kept}
        record["merged_test_loss"] = answer_loss(model, task.test, task.collate)
        report = dt.merge_quantized(from_original, original_weights=originals)
        record["merge_from_original"] = {"relative_frobenius": report.relative_frobenius,
                                         "delta_kept": report.delta_kept}
        record["merged_from_original_test_loss"] = answer_loss(from_original, task.test, task.collate)
    return record


@torch.no_grad()
def lm_static(model, task) -> dict:
    """No training, deterministic: each base's block weights against fp32's (relative Frobenius, the 35 together)
    and the test answer loss of the untuned LM on it."""
    weights_fp32 = {p: m.weight.detach() for p, m in model.named_modules() if re.fullmatch(LM_BLOCKS, p)}
    result = {"kind": "lm_static", "fp32": {"test_loss": answer_loss(model, task.test, task.collate)}}
    norm = sum(float(w.square().sum()) for w in weights_fp32.values())
    for base in ("bf16", "int8", "nf4"):
        quantized = copy.deepcopy(model)
        apply_base(quantized, base, LM_BLOCKS)
        error = sum(float((quantized.get_submodule(p).weight - w).square().sum()) for p, w in weights_fp32.items())
        result[base] = {"weight_relative_frobenius": (error / norm) ** 0.5,
                        "test_loss": answer_loss(quantized, task.test, task.collate)}
    return result


def lm_timing(model, task) -> list[dict]:
    """The step-time alternation of the MiniLM part on WordNet-LM: one real batch of LM_BATCH training items."""
    batch = task.collate([task.train[i] for i in range(LM_BATCH)])
    built = {base: lm_adapted(model, base, 0)[0] for base in ("fp32", "int8", "nf4")}
    return alternated_steps(built, batch, lm_loss_of, "lm_timing", "lm_saved_bytes")


def lm_rate_check(model, task, base: str, lr: float) -> dict:
    """Seed 0 at `lr`: the validation answer loss (what a rate is chosen by) and the test loss. Is fp32's rate
    also NF4's best, or does a quantized base want another (BENCHMARKING.md: tune at every setting compared)?"""
    model, _, _, seconds = lm_trained(model, task, base, 0, lr)
    return {"kind": "lm_rate", "base": base, "seed": 0, "lr": lr, "train_seconds": seconds,
            "validation_loss": answer_loss(model, task.validation, task.collate),
            "test_loss": answer_loss(model, task.test, task.collate)}


def lm_part(jsonl: Path, stop_at: str | None, static_only: bool = False) -> None:
    from deltatune.data import load_task
    from deltatune.data.wordnet_lm import load_wordnet_lm

    model, _ = load_wordnet_lm()
    task = load_task("gloss-generation")
    records = load_records(jsonl)
    if not any(r["kind"] == "lm_static" for r in records):
        append(jsonl, lm_static(model, task))
    if static_only:
        return
    if not any(r["kind"] == "lm_timing" for r in records) and not _past(stop_at):
        for record in lm_timing(model, task):
            append(jsonl, record)
    done = {(r["base"], r["seed"]) for r in records if r["kind"] == "lm"}
    for seed in SEEDS:
        for base in RUN_ORDER:  # as the MiniLM part: the QLoRA pair first
            if seed in LM_SEEDS[base] and (base, seed) not in done and not _past(stop_at):
                append(jsonl, lm_run(model, task, base, seed))
                print(json.dumps(load_records(jsonl)[-1]), flush=True)
    lm_rates_part(jsonl, records, model, task, stop_at)


def lm_rates_part(jsonl: Path, records: list[dict], model, task, stop_at: str | None) -> None:
    rated = {(r["base"], r["lr"]) for r in records if r["kind"] == "lm_rate"}
    for lr in LM_RATE_GRID:
        for base in ("fp32", "nf4"):  # side by side, in one run
            if (base, lr) not in rated and not _past(stop_at):
                append(jsonl, lm_rate_check(model, task, base, lr))
                print(json.dumps(load_records(jsonl)[-1]), flush=True)


def static(task) -> dict:
    """No training, deterministic: each base's stored bytes, its weights' relative Frobenius error against the
    fp32 checkpoint (the 36 encoder weights together), and how far its sentence features (the head's input) move
    on 256 test glosses (mean cosine to fp32's)."""
    torch.manual_seed(0)
    reference = task.build_model().eval()
    batch = task.collate([task.test[i] for i in range(min(256, len(task.test)))])
    features_fp32 = head_input(reference, batch)
    weights_fp32 = {p: m.weight.detach() for p, m in reference.named_modules() if p.startswith("backbone.encoder.")
                    and type(m) is torch.nn.Linear}
    result = {"kind": "static"}
    for base in ("bf16", "int8", "nf4", "nf4-no-dq"):
        model = copy.deepcopy(reference)
        memory = apply_base(model, base)
        error = sum(float((model.get_submodule(p).weight - w).square().sum()) for p, w in weights_fp32.items())
        norm = sum(float(w.square().sum()) for w in weights_fp32.values())
        weights = sum(w.numel() for w in weights_fp32.values())
        cosine = torch.nn.functional.cosine_similarity(head_input(model, batch), features_fp32, dim=-1)
        result[base] = {"stored_bytes": memory.stored_bytes if memory else 2 * weights, "weights": weights,
                        "weight_relative_frobenius": (error / norm) ** 0.5, "feature_cosine_mean": float(cosine.mean()),
                        "feature_cosine_min": float(cosine.min())}
    return result


@torch.no_grad()
def head_input(model, batch: dict) -> torch.Tensor:
    from deltatune.data.datasets import model_inputs

    seen = []
    handle = model.classifier.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        model(**model_inputs(batch))
    finally:
        handle.remove()
    return seen[0]


def encoder_weights(model) -> int:
    kinds = (torch.nn.Linear, dt.QuantizedLinear)
    return sum(m.in_features * m.out_features for p, m in model.named_modules()
               if p.startswith("backbone.encoder.") and type(m) in kinds)


def train_and_test(task, base: str, seed: int, lr: float) -> dict:
    from deltatune.train import TrainConfig, Trainer

    model, memory = build(task, base, seed)
    config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=lr, seed=seed, progress=False, eval_every_epoch=False,
                         log_every=10**6)
    start = time.perf_counter()
    Trainer(model, config, task.train, collate_fn=task.collate).train()
    record = {"kind": "run", "base": base, "seed": seed, "lr": lr, "train_seconds": time.perf_counter() - start}
    model.eval()
    record["test"] = task.score(model, task.test)
    weights = encoder_weights(model)
    record["base_bytes"] = memory.stored_bytes if memory else weights * (2 if base == "bf16" else 4)
    record["base_weights"] = weights
    if memory is None:  # a float merge is exact (the contract's tests): not re-measured here
        return record
    originals = build.originals  # the fp32 checkpoint's weights of the quantized layers
    requantized = copy.deepcopy(model)
    report = dt.merge_quantized(requantized)
    record["merge"] = {"max_abs": report.max_abs, "mean_abs": report.mean_abs,
                       "relative_frobenius": report.relative_frobenius,
                       "delta_relative_frobenius": report.delta_relative_frobenius, "delta_kept": report.delta_kept}
    record["merged_test"] = task.score(requantized, task.test)
    from_original = copy.deepcopy(model)
    report = dt.merge_quantized(from_original, original_weights=originals)
    record["merge_from_original"] = {"relative_frobenius": report.relative_frobenius, "delta_kept": report.delta_kept}
    record["merged_from_original_test"] = task.score(from_original, task.test)
    if seed == 0:  # the float merge is exact up to float rounding: checked on one seed
        float_merged = dt.unload(dt.dequantize_base(copy.deepcopy(model)), merge=True)
        record["float_merged_test"] = task.score(float_merged, task.test)
    return record


# --- step time and saved bytes ---------------------------------------------------------------------------------
def timing(task) -> list[dict]:
    batch = task.collate([task.train[i] for i in range(BATCH)])
    built = {}
    for base in ("fp32", "int8", "nf4"):  # bf16 here is fp32 compute on rounded weights: fp32's step
        model, _ = build(task, base, 0)
        built[base] = model
    return alternated_steps(built, batch, loss_of, "timing", "saved_bytes")


def alternated_steps(models: dict, batch: dict, loss_fn, kind: str, saved_kind: str) -> list[dict]:
    """BENCHMARKING.md's protocol: whole training steps (forward, backward, AdamW step, zero_grad) of every model
    on one real batch, alternated step by step, WARMUP dropped, median of STEPS, ratio to fp32's median in the
    same round, ROUNDS rounds; then the bytes autograd saves for backward in one forward of each."""
    built = {}
    for base, model in models.items():
        model.train()
        built[base] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    records = []
    for round_index in range(ROUNDS):
        seconds = {base: [] for base in built}
        for _ in range(WARMUP + STEPS):
            for base, (model, optimizer) in built.items():
                timer = harness.StepTimer()
                timer.on_step_begin()
                loss_fn(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                timer.on_step_end()
                seconds[base].append(timer.seconds[-1])
        medians = {base: statistics.median(s[WARMUP:]) for base, s in seconds.items()}
        records.append({"kind": kind, "round": round_index, "median_seconds": medians,
                        "ratio_to_fp32": {b: m / medians["fp32"] for b, m in medians.items()}})
    saved = {base: saved_for_backward_bytes(model, batch, loss_fn) for base, (model, _) in built.items()}
    records.append({"kind": saved_kind, "bytes": saved})
    return records


# --- the run ---------------------------------------------------------------------------------------------------
def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def run(jsonl: Path, stop_at: str | None, static_only: bool = False, part: str = "all") -> None:
    if part in ("all", "minilm"):
        minilm_part(jsonl, stop_at, static_only)
    if part in ("all", "lm"):
        lm_part(jsonl, stop_at, static_only)


def minilm_part(jsonl: Path, stop_at: str | None, static_only: bool = False) -> None:
    from deltatune.data import load_task
    from deltatune.recipe import evaluation_subsets

    task = evaluation_subsets(load_task(TASK, max_length=MAX_LENGTH, train_size=TRAIN_SIZE, seed=0),
                              VALIDATION_SIZE, TEST_SIZE)
    records = load_records(jsonl)
    if not any(r["kind"] == "static" for r in records):
        append(jsonl, static(task))
    if static_only:
        return
    done = {(r["base"], r["seed"], r["lr"]) for r in records if r["kind"] == "run"}
    if not any(r["kind"] == "timing" for r in records) and not _past(stop_at):
        for record in timing(task):  # first: short, and in the table even if the run is stopped early
            append(jsonl, record)
    for seed in SEEDS:
        for base in RUN_ORDER:  # the QLoRA pair (fp32, nf4) first, so a short run still compares it
            if (base, seed, LR) not in done and not _past(stop_at):
                append(jsonl, train_and_test(task, base, seed, LR))
                print(json.dumps(load_records(jsonl)[-1]), flush=True)


def _past(stop_at: str | None) -> bool:
    """True after `stop_at` (HH:MM, UTC, today): no new run starts then (finished ones stay in the JSONL)."""
    if stop_at is None:
        return False
    now = datetime.datetime.now(datetime.timezone.utc)
    hour, minute = map(int, stop_at.split(":"))
    return (now.hour, now.minute) >= (hour, minute)


def render(jsonl: Path, env: dict) -> str:
    records = load_records(jsonl)
    runs = [r for r in records if r["kind"] == "run"]
    tested = [r for r in runs if "test" in r]
    lines = ["# LoRA on a quantized frozen base (int8, NF4) vs a 32-bit and a 16-bit base", "",
             harness.environment_line(env), "",
             "Command: `/work/wt/slot env PYTHONPATH=src python benchmarks/quantized_base.py --threads 1 "
             "[--part minilm|lm]` (one CPU slot; resumes from the raw records, quantized_base.jsonl)", "",
             *[_flowed(p) + "\n" for p in (__doc__ or "").split("\n\n")[1:6]],
             f"Learning rate {LR:g} for every base (tuned once on fp32 in sparse_accuracy.md, where LoRA r8 on these "
             "36 layers scored 84.9 ± 0.7 on this recipe).", "",
             "| base | stored bytes of the 36 encoder weights | × float32 | bits / weight | test accuracy | "
             "after merge-back | merge-back rel. Frobenius error | max abs error | ‖ΔW‖/‖W‖ | share of ΔW kept | "
             "merged back from the fp32 weights: test accuracy | its share of ΔW kept |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for base in BASES:
        rows = [r for r in tested if r["base"] == base]
        if not rows:
            continue
        stored, weights = rows[0]["base_bytes"], rows[0]["base_weights"]
        merged = [r["merged_test"] for r in rows if "merged_test" in r]
        errors = [r["merge"] for r in rows if "merge" in r]
        frob = mean_std([e["relative_frobenius"] for e in errors], scale=1, digits=4) if errors else "0 (float merge)"
        worst = f"{max(e['max_abs'] for e in errors):.3g}" if errors else "–"
        delta = mean_std([e["delta_relative_frobenius"] for e in errors], scale=1, digits=4) if errors else "–"
        kept = mean_std([e["delta_kept"] for e in errors], scale=1, digits=3) if errors else "1 (exact)"
        originals = [r for r in rows if "merge_from_original" in r]
        from_original = mean_std([r["merged_from_original_test"] for r in originals], empty="–")
        kept_original = mean_std([r["merge_from_original"]["delta_kept"] for r in originals], scale=1, digits=3,
                                 empty="–")
        lines.append(f"| {base} | {stored:,} | {stored / (4 * weights):.3f} | {8 * stored / weights:.3f} | "
                     f"{mean_std([r['test'] for r in rows])} (n={len(rows)}) | "
                     f"{mean_std(merged, empty='= unmerged (exact)')} | "
                     f"{frob} | {worst} | {delta} | {kept} | {from_original} | {kept_original} |")
    floats = [r for r in tested if "float_merged_test" in r]
    if floats:
        same = all(abs(r["float_merged_test"] - r["test"]) < 1e-9 for r in floats)
        lines += ["", "Float merge of the quantized runs (dequantize_base, then unload(merge=True)): test accuracy "
                  + ("equal to the unmerged model's in every run." if same else
                     "; ".join(f"{r['base']} seed {r['seed']}: {100 * r['float_merged_test']:.2f}% vs "
                               f"{100 * r['test']:.2f}%" for r in floats))]
    lines += render_static(records)
    lines += render_peers(jsonl.with_name(jsonl.stem + "_peers.json"))
    lines += ["", "Per seed (test accuracy %, unmerged / merged back):", ""]
    for base in BASES:
        rows = sorted((r for r in tested if r["base"] == base), key=lambda r: r["seed"])
        lines.append(f"- {base}: " + ", ".join(f"seed {r['seed']}: {100 * r['test']:.2f} / "
                                               f"{100 * r.get('merged_test', r['test']):.2f}" for r in rows))
    lines += render_timing(records, "timing", "saved_bytes", BATCH)
    lines += render_lm(records)
    return "\n".join(lines) + "\n"


def render_lm(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["kind"] == "lm"]
    if not rows:
        return []
    seeds = sorted({r["seed"] for r in rows})
    lines = ["", "## WordNet-LM (causal LM)", "",
             f"WordNet-LM (Llama, 5 blocks; `gloss-generation`): LoRA r8 on every Linear but the tied head, "
             f"{LM_STEPS} steps, batch {LM_BATCH}, lr {LM_LR:g} (tuned on the fp32 LM for this recipe in "
             "sketchtune.md, reused for every base as in the MiniLM part), the 35 block Linears as the base; test "
             f"answer loss (nats/token, 250 test items; seeds {', '.join(map(str, seeds))}):", "",
             "| base | stored bytes | × float32 | bits / weight | test loss | − fp32's (paired mean) | "
             "after merge-back | merge-back rel. Frobenius error | share of ΔW kept | "
             "merged back from the fp32 weights: test loss | its share of ΔW kept |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---|---:|"]
    fp32 = {r["seed"]: r["test_loss"] for r in rows if r["base"] == "fp32"}
    for base in BASES:
        mine = [r for r in rows if r["base"] == base]
        if not mine:
            continue
        errors = [r["merge"] for r in mine if "merge" in r]
        merged = [r["merged_test_loss"] for r in mine if "merged_test_loss" in r]
        from_original = [r["merged_from_original_test_loss"] for r in mine if "merge_from_original" in r]
        kept_original = [r["merge_from_original"]["delta_kept"] for r in mine if "merge_from_original" in r]
        stored, weights = mine[0]["base_bytes"], mine[0]["base_weights"]
        losses = [r["test_loss"] for r in mine]
        paired = [r["test_loss"] - fp32[r["seed"]] for r in mine if r["seed"] in fp32]
        lines.append(f"| {base} | {stored:,} | {stored / (4 * weights):.3f} | {8 * stored / weights:.3f} | "
                     f"{mean_std(losses, scale=1, digits=4)} (n={len(mine)}) | "
                     f"{statistics.fmean(paired):+.4f} | "
                     f"{mean_std(merged, scale=1, digits=4, empty='= unmerged (exact)')} | "
                     f"{mean_std([e['relative_frobenius'] for e in errors], scale=1, digits=4, empty='0')} | "
                     f"{mean_std([e['delta_kept'] for e in errors], scale=1, digits=3, empty='1 (exact)')} | "
                     f"{mean_std(from_original, scale=1, digits=4, empty='–')} | "
                     f"{mean_std(kept_original, scale=1, digits=3, empty='–')} |")
    lines += ["", "Per seed (test loss, unmerged / merged back / merged back from the fp32 weights):", ""]
    for base in BASES:
        mine = sorted((r for r in rows if r["base"] == base), key=lambda r: r["seed"])
        lines.append(f"- {base}: " + ", ".join(
            f"seed {r['seed']}: {r['test_loss']:.4f} / {r.get('merged_test_loss', r['test_loss']):.4f} / "
            f"{r.get('merged_from_original_test_loss', r['test_loss']):.4f}" for r in mine))
    return (lines + render_lm_rates(records) + render_lm_static(records)
            + render_timing(records, "lm_timing", "lm_saved_bytes", LM_BATCH))


def render_lm_rates(records: list[dict]) -> list[str]:
    rates = [r for r in records if r["kind"] == "lm_rate"]
    if not rates:
        return []
    grid = sorted({r["lr"] for r in rates})
    lines = ["", "The rate, re-checked on both bases (seed 0, fp32 and nf4 side by side in one run): validation answer "
             "loss / test loss at each rate, the best validation loss in bold:", "",
             "| base | " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "|---|" + "---:|" * len(grid)]
    for base in ("fp32", "nf4"):
        mine = {r["lr"]: r for r in rates if r["base"] == base}
        if not mine:
            continue
        best = min(mine, key=lambda lr: mine[lr]["validation_loss"])
        cells = [("**{:.4f}**" if lr == best else "{:.4f}").format(mine[lr]["validation_loss"])
                 + f" / {mine[lr]['test_loss']:.4f}" if lr in mine else "–" for lr in grid]
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    return lines


def render_lm_static(records: list[dict]) -> list[str]:
    statics = [r for r in records if r["kind"] == "lm_static"]
    if not statics:
        return []
    lines = ["", "Before training (deterministic): the 35 block weights against fp32's, and the untuned LM's test "
             "loss on each base:", "", "| base | weight rel. Frobenius error | test loss before tuning |",
             "|---|---:|---:|"]
    for base, row in statics[-1].items():
        if base != "kind":
            lines.append(f"| {base} | {row.get('weight_relative_frobenius', 0):.4f} | {row['test_loss']:.4f} |")
    return lines


def render_timing(records: list[dict], kind: str, saved_kind: str, batch: int) -> list[str]:
    lines = []
    timings = [r for r in records if r["kind"] == kind]
    if timings:
        lines += ["", f"Step time (median of {STEPS} whole training steps, batch {batch}, alternated in one "
                  "process):", "", "| round | fp32 (s) | int8 (s) | nf4 (s) | int8 × fp32 | nf4 × fp32 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in timings:
            m, q = r["median_seconds"], r["ratio_to_fp32"]
            lines.append(f"| {r['round']} | {m['fp32']:.3f} | {m['int8']:.3f} | {m['nf4']:.3f} | "
                         f"{q['int8']:.2f} | {q['nf4']:.2f} |")
    saved = [r for r in records if r["kind"] == saved_kind]
    if saved:
        lines += ["", f"Bytes autograd saves for backward in one forward (batch {batch}): "
                  + ", ".join(f"{b} {v / 2**20:.1f} MiB" for b, v in saved[-1]["bytes"].items()) + "."]
    return lines


def render_peers(path: Path) -> list[str]:
    """The peers' check (benchmarks/quantized_base_peers.py, run in a scratch venv that holds them)."""
    if not path.exists():
        return []
    peers = json.loads(path.read_text())
    lines = ["", f"Peers on CPU with torch {peers['torch']} (`{path.name}`, from benchmarks/quantized_base_peers.py "
             "in a scratch venv; none is a deltatune dependency): a 384x384 Linear, forward + backward, batch 8:", "",
             "| peer layer | runs on CPU | max abs vs fp32 output |", "|---|---|---:|"]
    for name, row in peers["runs on CPU"].items():
        if row["runs"]:
            lines.append(f"| {name} | yes | {row['max_abs_vs_fp32']:.4g} |")
        else:
            lines.append(f"| {name} | no: {row['error']} | – |")
    same = peers["same weights"]
    codebook = same["codebook max |ours - bitsandbytes|"]
    lines += ["", f"Same weights: our NF4 codebook is bitsandbytes' to {codebook:.1e}."]
    for name, row in same.items():
        if not isinstance(row, dict):
            continue
        ours, theirs = row["nf4 relative error: ours, bitsandbytes"]
        dq = ", ".join(f"{v:.5f}" for v in row["nf4 + double quant relative error: ours, bitsandbytes, torchao"])
        int8_equal = row["int8 share of codes equal to bitsandbytes'"]
        lines.append(f"- {name}: NF4 without double quantization, max |ours − bitsandbytes| "
                     f"{row['nf4 max |ours - bitsandbytes| (no double quant)']:.1e} (the same codes), relative "
                     f"error {ours:.5f} vs {theirs:.5f}; with double quantization (ours, bitsandbytes, torchao) "
                     f"{dq}; int8 codes equal to bitsandbytes' (from float16) {100 * int8_equal:.1f}%.")
    return lines


def render_static(records: list[dict]) -> list[str]:
    statics = [r for r in records if r["kind"] == "static"]
    if not statics:
        return []
    lines = ["", "Before training (deterministic): the 36 encoder weights of each base against the fp32 checkpoint, "
             "and the sentence features (the head's input) on 256 test glosses:", "",
             "| base | stored bytes | × float32 | bits / weight | weight rel. Frobenius error | feature cosine to fp32 "
             "(mean / min) |", "|---|---:|---:|---:|---:|---|"]
    for base, row in statics[-1].items():
        if base == "kind":
            continue
        stored, weights = row["stored_bytes"], row["weights"]
        lines.append(f"| {base} | {stored:,} | {stored / (4 * weights):.3f} | {8 * stored / weights:.3f} | "
                     f"{row['weight_relative_frobenius']:.4f} | {row['feature_cosine_mean']:.4f} / "
                     f"{row['feature_cosine_min']:.4f} |")
    return lines


def _flowed(paragraph: str) -> str:
    """A docstring paragraph as Markdown: its lines joined, bullets ("- ") kept on their own lines."""
    return " ".join(re.sub(r"\n(?!- )", " ", paragraph).split(" ")).replace("  ", " ").replace("   ", " ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/quantized_base")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render", action="store_true", help="only re-write the report from the JSONL")
    parser.add_argument("--stop-at", help="HH:MM UTC: start no new training run after this time")
    parser.add_argument("--part", choices=("all", "minilm", "lm"), default="all",
                        help="the MiniLM classifier, the WordNet-LM causal LM, or both (default)")
    parser.add_argument("--static-only", action="store_true",
                        help="only the deterministic part (bytes, weight and feature error; seconds, no training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    jsonl = Path(f"{args.output}.jsonl")
    if not args.render:
        run(jsonl, args.stop_at, args.static_only, args.part)
    report = Path(f"{args.output}.md")
    harness.write_report(report, render(jsonl, harness.environment(threads=args.threads)), keep_reading=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

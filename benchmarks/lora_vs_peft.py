"""deltatune LoRA vs peft LoRA: training-step time, forward time and memory on all-MiniLM-L6-v2.

Both contenders train the same model — all-MiniLM-L6-v2 (read offline from the packaged files), mean pooling,
a Linear head with 10 classes (the `wordnet-nouns` task) — with LoRA rank 8, alpha 16, dropout 0 on
`query` and `value`, the head trained too (deltatune `extra_trainable`, peft `modules_to_save`), float32, AdamW
(lr 1e-4, torch defaults), on the same batch of 32 real WordNet glosses padded to 32 tokens. The base model
stays in train mode, so its own dropout layers (p = 0.1) run in both, identically. Nothing is compiled.

Steps: warm-up, then blocks of steps alternating between contenders in mirrored order (A B, B A, A B ...), each
whole step timed alone (forward + loss + backward + AdamW step + zero_grad). The table reports the median per
contender and the ratio of medians; the whole run is repeated (`--repeats`) and every ratio reported. Forward
time (eval mode, no grad) is timed the same way, so each step is also a multiple of its forward.

A third, informative contender `floor` is the same frozen model with no adapter at all, the outputs of the
targeted layers made to require grad so that backward runs exactly as deep as LoRA's: the step any LoRA
implementation would take if its own branch cost nothing.

Memory: each contender runs alone in a fresh child process (peak RSS = ru_maxrss); the training state
(gradients + AdamW moments of the trainable tensors, and the activations autograd saves for backward, counted
by storage through `saved_tensors_hooks`) is computed from tensor sizes.

Before timing, the same non-zero LoRA weights are put in both models (deltatune writes a peft folder, peft
loads it) and their logits, training loss and gradients are compared.

The raw numbers go to `--json` (default benchmarks/results/lora_vs_peft_t<threads>.json); `--render` re-writes
this thread count's block of `--output` from that file without measuring.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_vs_peft.py --threads 2 --repeats 2 \
        --output benchmarks/results/lora_vs_peft.md
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_vs_peft.py --threads 2 --render \
        --output benchmarks/results/lora_vs_peft.md
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from deltatune.bench import harness  # noqa: E402
from deltatune.core.atomic import atomic_write_text  # noqa: E402

RANK, ALPHA, DROPOUT, TARGETS = 8, 16.0, 0.0, ("query", "value")
BATCH, MAX_TOKENS, NUM_CLASSES, LEARNING_RATE, SEED = 32, 32, 10, 1e-4, 0
TASK = "wordnet-nouns"
CONTENDERS = ("deltatune", "peft", "floor")
MIB = 1024 * 1024


# --- the shared model and batch -------------------------------------------------------------------------------
def real_batch() -> tuple[dict[str, Tensor], Tensor]:
    """The first BATCH training examples of the wordnet-nouns task (WordNet glosses, MiniLM-tokenized)."""
    from deltatune.data import load_task

    task = load_task(TASK, max_length=MAX_TOKENS)
    batch = task.collate([task.train[i] for i in range(BATCH)])
    if task.num_classes != NUM_CLASSES:
        raise RuntimeError(f"{TASK} has {task.num_classes} classes, the benchmark expects {NUM_CLASSES}")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]


def base_classifier() -> nn.Module:
    """MiniLM + mean pooling + Linear(384, 10); the head drawn from torch's RNG after `manual_seed(SEED)`."""
    from deltatune.data.models import SentenceClassifier, load_minilm_backbone

    torch.manual_seed(SEED)
    return SentenceClassifier(load_minilm_backbone(), NUM_CLASSES)


def adapt_deltatune(model: nn.Module) -> nn.Module:
    import deltatune

    config = deltatune.LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=list(TARGETS),
                                  extra_trainable=["classifier"])
    torch.manual_seed(SEED + 1)
    return deltatune.adapt(model, config)


def adapt_peft(model: nn.Module) -> nn.Module:
    import peft

    # peft's defaults otherwise (init_lora_weights=True: Kaiming A, zero B; no rsLoRA, no DoRA, bias "none")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=list(TARGETS),
                             modules_to_save=["classifier"])
    torch.manual_seed(SEED + 1)
    return peft.get_peft_model(model, config)


def adapt_floor(model: nn.Module) -> nn.Module:
    """No adapter: frozen base and trainable head, the targets' outputs made to require grad so that backward
    runs exactly where a LoRA's would (down to layer 0's query and value, no further)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in model.classifier.parameters():
        parameter.requires_grad_(True)
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in TARGETS:
            module.register_forward_hook(_require_grad)
    return model


def _require_grad(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return out if out.requires_grad or not torch.is_grad_enabled() else out.requires_grad_(True)


ADAPTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deltatune": adapt_deltatune, "peft": adapt_peft, "floor": adapt_floor,
}


@dataclass
class Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build(name: str, base: nn.Module) -> Contender:
    model = ADAPTERS[name](base).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    return Contender(name, model, optimizer)


def train_step(contender: Contender, inputs: dict[str, Tensor], labels: Tensor) -> Tensor:
    loss = F.cross_entropy(contender.model(**inputs), labels)
    loss.backward()
    contender.optimizer.step()
    contender.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def forward_only(contender: Contender, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return contender.model(**inputs)


# --- numerical equality -----------------------------------------------------------------------------------------
def copy_deltatune_into_peft(dt_model: nn.Module, peft_model: nn.Module, folder: Path) -> None:
    """deltatune writes a peft folder, peft reads it: both models then hold the same LoRA and head tensors."""
    import peft
    from safetensors.torch import load_file

    import deltatune

    deltatune.save_adapter(dt_model, folder, format="peft")
    result = peft.set_peft_model_state_dict(peft_model, load_file(str(folder / "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise RuntimeError(f"peft load mismatch: unexpected {result.unexpected_keys}, missing {missing}")


def lora_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Trainable tensors keyed by (module path, 'A'/'B'/head name), the same keys for both libraries."""
    out = {}
    for key, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = key.replace("base_model.model.", "").replace(".modules_to_save.default", "")
        key = key.replace(".lora_A.default.weight", ".A").replace(".lora_B.default.weight", ".B")
        key = key.replace(".deltas.default.lora_A", ".A").replace(".deltas.default.lora_B", ".B")
        out[key] = parameter
    return out


def check_equal_math(dt: Contender, pf: Contender, inputs: dict[str, Tensor], labels: Tensor) -> dict:
    """Same non-zero LoRA weights in both: eval logits, train-mode loss (same dropout seed) and gradients."""
    generator = torch.Generator().manual_seed(SEED + 2)
    initial = {k: v.detach().clone() for k, v in lora_tensors(dt.model).items()}
    with torch.no_grad():
        for key, parameter in lora_tensors(dt.model).items():
            if key.endswith(".B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        copy_deltatune_into_peft(dt.model, pf.model, Path(tmp) / "adapter")
        report = _compare_models(dt.model, pf.model, inputs, labels)
        with torch.no_grad():  # back to the common initial state (B = 0) for the timed training
            for key, parameter in lora_tensors(dt.model).items():
                parameter.copy_(initial[key])
        copy_deltatune_into_peft(dt.model, pf.model, Path(tmp) / "adapter_init")
    report["trainable_parameters"] = {c.name: sum(p.numel() for p in c.trainable()) for c in (dt, pf)}
    report["deltatune_target_node"] = _target_autograd_node(dt.model, inputs)
    return report


def _target_autograd_node(model: nn.Module, inputs: dict[str, Tensor]) -> str:
    """The autograd node deltatune's adapted `query` produces in training (shows whether the fused path ran)."""
    nodes = []
    query = next(m for path, m in model.named_modules() if path.endswith(TARGETS[0]))
    handle = query.register_forward_hook(lambda module, args, out: nodes.append(type(out.grad_fn).__name__))
    model(**inputs)
    handle.remove()
    return nodes[0]


def _compare_models(dt_model: nn.Module, peft_model: nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> dict:
    dt_model.eval(), peft_model.eval()
    with torch.no_grad():
        logits_diff = (dt_model(**inputs) - peft_model(**inputs)).abs().max().item()
    dt_model.train(), peft_model.train()
    losses, grads = [], []
    for model in (dt_model, peft_model):
        torch.manual_seed(SEED + 3)  # the base model's dropout masks: the same draws for both
        loss = F.cross_entropy(model(**inputs), labels)
        loss.backward()
        losses.append(loss.item())
        grads.append({k: p.grad.detach().clone() for k, p in lora_tensors(model).items()})
        model.zero_grad(set_to_none=True)
    if set(grads[0]) != set(grads[1]):
        raise RuntimeError(f"trainable tensors differ: {sorted(set(grads[0]) ^ set(grads[1]))}")
    grad_diff = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
    grad_scale = max(grads[1][k].abs().max().item() for k in grads[1])
    return {"max_abs_logit_diff": logits_diff, "loss_deltatune": losses[0], "loss_peft": losses[1],
            "max_abs_grad_diff": grad_diff, "max_abs_grad": grad_scale, "tensors_compared": len(grads[0])}


# --- timing -------------------------------------------------------------------------------------------------
def timed(action: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call. CPU time does not count the time the process
    waits for a core, so on a shared machine it is the steadier of the two (with one thread, it is the work)."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(actions: dict[str, Callable[[], object]], blocks: int, per_block: int) -> dict[str, dict[str, list]]:
    """Blocks of `per_block` timed calls, contenders alternating in mirrored order (A B C, C B A, ...)."""
    times: dict[str, dict[str, list]] = {name: {"wall": [], "cpu": []} for name in actions}
    names = list(actions)
    for block in range(blocks):
        for name in names if block % 2 == 0 else names[::-1]:
            for _ in range(per_block):
                wall, cpu = timed(actions[name])
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    return times


def run_timing(contenders: list[Contender], inputs: dict[str, Tensor], labels: Tensor, args) -> dict:
    steps = {c.name: (lambda c=c: train_step(c, inputs, labels)) for c in contenders}
    forwards = {c.name: (lambda c=c: forward_only(c, inputs)) for c in contenders}
    for action in steps.values():
        for _ in range(args.warmup):
            action()
    step_times = alternate(steps, args.blocks, args.steps_per_block)
    for contender in contenders:
        contender.model.eval()
    for action in forwards.values():
        for _ in range(args.warmup):
            action()
    forward_times = alternate(forwards, args.blocks, args.steps_per_block)
    for contender in contenders:
        contender.model.train()
    return {"step_seconds": step_times, "forward_seconds": forward_times}


# --- memory (one fresh child process per contender) ---------------------------------------------------------
def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def saved_activation_bytes(contender: Contender, inputs: dict[str, Tensor], labels: Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one step, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in contender.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(contender.model(**inputs), labels)
    loss.backward()
    contender.optimizer.zero_grad(set_to_none=True)
    return sum(saved.values())


def memory_child(name: str, args) -> dict:
    """Run in a fresh process: build one contender, train `args.memory_steps` steps, report sizes and RSS."""
    torch.set_num_threads(args.threads)
    inputs, labels = real_batch()
    rss_before_model = rss_mib()
    contender = build(name, base_classifier())
    rss_after_build = rss_mib()
    for _ in range(args.memory_steps):
        train_step(contender, inputs, labels)
    trainable = contender.trainable()
    grads = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(t.numel() * t.element_size() for state in contender.optimizer.state.values()
                  for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    activations = saved_activation_bytes(contender, inputs, labels)
    return {"name": name, "peak_rss_mib": rss_mib(), "rss_before_model_mib": rss_before_model,
            "rss_after_build_mib": rss_after_build, "trainable_parameters": sum(p.numel() for p in trainable),
            "gradient_bytes": grads, "optimizer_state_bytes": moments, "saved_activation_bytes": activations}


def _time_v_max_rss(stderr: str) -> float:
    line = next(line for line in stderr.splitlines() if "Maximum resident set size" in line)
    return int(line.rsplit(":", 1)[1]) / 1024


def run_memory(names: list[str], args) -> list[dict]:
    results = []
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            # Through /usr/bin/time: a child forked straight from this big process would inherit its RSS high-water
            # mark into ru_maxrss (Linux copies it at fork/exec); time's own small image keeps the child's clean.
            command = ["/usr/bin/time", "-v", sys.executable, __file__, "--memory-child", name,
                       "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]
            done = harness.run_process(command, label=f"memory child {name}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["time_v_max_rss_mib"] = _time_v_max_rss(done.stderr)
            results.append(result)
    return results


# --- profile (where the time goes) ----------------------------------------------------------------------------
def profile_ops(contenders: list[Contender], inputs: dict[str, Tensor], labels: Tensor, steps: int) -> dict:
    """Self CPU milliseconds per step of each aten op, per contender (torch.profiler, `steps` steps each)."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for contender in contenders:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                train_step(contender, inputs, labels)
        rows = {e.key: (e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in prof.key_averages()
                if e.key.startswith("aten::")}
        tables[contender.name] = rows
    return tables


# --- report -----------------------------------------------------------------------------------------------------
def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def summarize(run: dict, clock: str = "wall") -> dict:
    steps = {n: median_ms(v[clock]) for n, v in run["step_seconds"].items()}
    forwards = {n: median_ms(v[clock]) for n, v in run["forward_seconds"].items()}
    return {"step_ms": steps, "forward_ms": forwards,
            "step_ratio": steps["deltatune"] / steps["peft"], "forward_ratio": forwards["deltatune"] / forwards["peft"],
            "step_over_forward": {n: steps[n] / forwards[n] for n in steps}}


def machine() -> dict:
    import peft
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    env = harness.environment()
    return {"cpu": model, "cores": env["cores"], "torch": env["torch"], "peft": peft.__version__,
            "transformers": transformers.__version__, "python": env["python"], "commit": env["commit"]}


def render(raw: dict) -> str:
    cfg, mach = raw["config"], raw["machine"]
    lines = [
        f"Measured {raw['date']} on {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, "
        f"peft {mach['peft']}, transformers {mach['transformers']}, Python {mach['python']}, deltatune at "
        f"{mach['commit']}; torch.set_num_threads({cfg['threads']}). Load average (1 min) before / after: "
        f"{raw['load_before']:.2f} / {raw['load_after']:.2f}.",
        "",
        f"    {raw['command']}",
        "",
        f"Setup: {TASK} batch of {BATCH} glosses x {MAX_TOKENS} tokens, float32, LoRA r={RANK} alpha={ALPHA:g} "
        f"dropout={DROPOUT:g} on {list(TARGETS)} + trained head, AdamW lr {LEARNING_RATE:g}, seed {SEED}, base "
        f"model in train mode (its own dropout p=0.1 on). Warm-up {cfg['warmup']} steps per contender; "
        f"{cfg['blocks']} blocks x {cfg['steps_per_block']} timed steps per contender per run, mirrored "
        "alternation; forward = eval mode, no grad, timed the same way.",
        "",
        "| run | clock | deltatune step (ms) | peft step (ms) | floor step (ms) | **step ratio dt/peft** | "
        "floor/peft | dt fwd (ms) | peft fwd (ms) | fwd ratio | dt step/fwd | peft step/fwd | floor step/fwd |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for index, run in enumerate(raw["runs"], 1):
        for clock in ("wall", "cpu"):
            s = summarize(run, clock)
            st, fw, so = s["step_ms"], s["forward_ms"], s["step_over_forward"]
            lines.append(
                f"| {index} | {clock} | {st['deltatune']:.1f} | {st['peft']:.1f} | {st['floor']:.1f} | "
                f"**{s['step_ratio']:.3f}** | {st['floor'] / st['peft']:.3f} | {fw['deltatune']:.1f} | "
                f"{fw['peft']:.1f} | {s['forward_ratio']:.3f} | {so['deltatune']:.2f} | {so['peft']:.2f} | "
                f"{so['floor']:.2f} |")
    lines += ["", "Medians. `wall` = time.perf_counter, the claim; `cpu` = time.process_time of the process (all its "
              "threads), which ignores time spent waiting for a core on the shared machine. `floor` = the same "
              "frozen model without any adapter, backward forced exactly as deep as LoRA's (the targets' outputs "
              "require grad): the step of a LoRA whose own branch would cost nothing.", ""]
    lines += render_check(raw["check"]) + render_memory(raw["memory"]) + render_raw(raw)
    if raw.get("profile"):
        lines += render_profile(raw["profile"])
    return "\n".join(lines) + "\n"


def render_check(check: dict) -> list[str]:
    return [
        "Numerical equality (same non-zero LoRA weights and head: deltatune writes a peft folder, peft loads it): "
        f"max |logit difference| (eval) = {check['max_abs_logit_diff']:.2e}; train-mode loss (same dropout seed) "
        f"{check['loss_deltatune']:.7f} vs {check['loss_peft']:.7f}; max |gradient difference| over "
        f"{check['tensors_compared']} trainable tensors = {check['max_abs_grad_diff']:.2e} (largest gradient "
        f"{check['max_abs_grad']:.2e}). Trainable parameters: {check['trainable_parameters']}. Autograd node of "
        f"deltatune's adapted `{TARGETS[0]}` in training: `{check['deltatune_target_node']}`.", ""]


def render_memory(memory: list[dict]) -> list[str]:
    lines = ["Memory, each contender alone in a fresh process (RSS in MiB; training state from tensor sizes, MiB):",
             "", "| contender | peak RSS (ru_maxrss) | /usr/bin/time -v | peak before model | peak after build | "
             "trainable params | grads | AdamW moments | saved activations |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in memory:
        lines.append(
            f"| {r['name']} | {r['peak_rss_mib']:.1f} | {r['time_v_max_rss_mib']:.1f} | "
            f"{r['rss_before_model_mib']:.1f} | {r['rss_after_build_mib']:.1f} | {r['trainable_parameters']:,} | "
            f"{r['gradient_bytes'] / MIB:.3f} | {r['optimizer_state_bytes'] / MIB:.3f} | "
            f"{r['saved_activation_bytes'] / MIB:.2f} |")
    peak = {n: statistics.median(r["peak_rss_mib"] for r in memory if r["name"] == n) for n in ("deltatune", "peft")}
    growth = {n: statistics.median(r["peak_rss_mib"] - r["rss_before_model_mib"] for r in memory if r["name"] == n)
              for n in ("deltatune", "peft")}
    state = {n: statistics.median(r["gradient_bytes"] + r["optimizer_state_bytes"] + r["saved_activation_bytes"]
                                  for r in memory if r["name"] == n) for n in ("deltatune", "peft")}
    lines += ["", f"Ratios dt/peft (medians): peak RSS {peak['deltatune'] / peak['peft']:.3f}; peak RSS minus RSS "
              f"before the model {growth['deltatune'] / growth['peft']:.3f}; training state (grads + moments + saved "
              f"activations) {state['deltatune'] / state['peft']:.3f}.", ""]
    return lines


def render_raw(raw: dict) -> list[str]:
    lines = ["Raw timings (ms, wall / cpu, in the order measured within each contender):", ""]
    for index, run in enumerate(raw["runs"], 1):
        for kind in ("step_seconds", "forward_seconds"):
            for name, clocks in run[kind].items():
                pairs = ", ".join(f"{1000 * w:.0f}/{1000 * c:.0f}" for w, c in zip(clocks["wall"], clocks["cpu"]))
                lines.append(f"- run {index} {kind.split('_')[0]} {name}: {pairs}")
    return lines + [""]


def render_profile(tables: dict) -> list[str]:
    names = list(tables)
    ops = sorted({op for t in tables.values() for op in t},
                 key=lambda op: -max(t.get(op, (0, 0))[0] for t in tables.values()))
    lines = ["Where a step spends its time (torch.profiler self CPU ms per step, calls per step; profiled run, so "
             "absolute times are inflated):", "",
             "| op | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for op in ops[:25]:
        cells = [f"{tables[n][op][0]:.1f} ({tables[n][op][1]})" if op in tables[n] else "-" for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"{sum(v[0] for v in tables[n].values()):.1f}" for n in names]
    return lines + ["| all aten ops | " + " | ".join(totals) + " |", ""]


def write_markdown(path: Path, body: str, threads: int) -> None:
    """Replace only this thread count's generated block, so hand-written notes and the other blocks survive."""
    begin = f"<!-- generated by benchmarks/lora_vs_peft.py, threads={threads} -->"
    end = f"<!-- end of generated block, threads={threads} -->"
    block = f"{begin}\n## torch.set_num_threads({threads})\n\n{body}{end}\n"
    text = path.read_text() if path.exists() else "# deltatune LoRA vs peft LoRA\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text + block
    atomic_write_text(path, text)


# --- main -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="whole timing runs (default 2)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per contender per run")
    parser.add_argument("--blocks", type=int, default=6, help="alternation blocks per run")
    parser.add_argument("--steps-per-block", type=int, default=4, help="timed steps per contender per block")
    parser.add_argument("--memory-steps", type=int, default=5, help="training steps in each memory child")
    parser.add_argument("--profile-steps", type=int, default=0, help="also profile this many steps per contender")
    parser.add_argument("--output", type=Path, default=None, help="write/refresh the Markdown results here")
    parser.add_argument("--json", type=Path, default=None,
                        help="the raw results (default: benchmarks/results/lora_vs_peft_t<threads>.json)")
    parser.add_argument("--render", action="store_true", help="only re-write --output's block from --json")
    parser.add_argument("--memory-child", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = Path(__file__).resolve().parent / "results" / f"lora_vs_peft_t{args.threads}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        harness.emit(memory_child(args.memory_child, args))
        return
    if args.render:
        if not args.json.exists():
            raise SystemExit(f"no raw results at {args.json}; run the benchmark (without --render) to measure them")
        raw = json.loads(args.json.read_text())
        print(render(raw))
        if args.output:
            write_markdown(args.output, render(raw), raw["config"]["threads"])
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    inputs, labels = real_batch()
    base = base_classifier()
    contenders = [build(name, copy.deepcopy(base)) for name in CONTENDERS]
    check = check_equal_math(contenders[0], contenders[1], inputs, labels)
    print(json.dumps(check), flush=True)
    runs = []
    for repeat in range(args.repeats):
        runs.append(run_timing(contenders, inputs, labels, args))
        for clock in ("wall", "cpu"):
            print(f"run {repeat + 1} {clock}:", json.dumps(summarize(runs[-1], clock)), flush=True)
    profile = profile_ops(contenders, inputs, labels, args.profile_steps) if args.profile_steps else None
    del contenders, base
    memory = run_memory(["deltatune", "peft"], args)
    raw = {"date": harness.environment()["date"], "machine": machine(),
           "command": "HF_HUB_OFFLINE=1 " + harness.command_line([__file__, *(sys.argv[1:] if argv is None else argv)]),
           "config": vars(args) | {"output": str(args.output), "json": str(args.json)}, "check": check,
           "runs": runs, "memory": memory, "profile": profile, "load_before": load_before,
           "load_after": os.getloadavg()[0]}
    harness.write_json(args.json, raw)
    print(render(raw))
    if args.output:
        write_markdown(args.output, render(raw), args.threads)


if __name__ == "__main__":
    main()

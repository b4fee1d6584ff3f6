"""`TrainConfig`: every knob of the training loop, validated when built."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deltatune.errors import config_check

SCHEDULES = ("linear", "cosine", "constant")
SHARDINGS = ("ddp", "fsdp")
# The update rules tested on a sharded model; the others read (A, B) pairs or re-run the step (untested there).
FSDP_UPDATE_RULES = ("adamw", "loraplus")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of `Trainer`.

    Args:
        epochs: passes over the training data (ignored when `max_steps` is set).
        max_steps: optimizer steps to run; when set it overrides `epochs` (training wraps into as many epochs
            as needed), as in the Hugging Face Trainer.
        batch_size: the GLOBAL batch per optimizer step, summed over processes and accumulation micro-batches.
            Under `torchrun` each process takes a balanced share of it.
        grad_accum_steps: micro-batches per process per optimizer step (memory, not maths: the gradient is the
            same as one big batch, micro-batches are weighted by their size).
        lr: peak learning rate (reached after warm-up).
        weight_decay: AdamW decoupled weight decay (the default optimizer only; 0 as in the HF Trainer).
        warmup_ratio: share of the total steps spent in linear warm-up (rounded up to whole steps).
        warmup_steps: warm-up length in steps; give this or `warmup_ratio`, not both.
        schedule: learning-rate shape after warm-up: "linear" decay to 0, "cosine" decay to 0, or "constant".
        max_grad_norm: clip the global gradient L2 norm to this value; None disables clipping.
        eval_every_epoch: evaluate the eval dataset at the end of every epoch (and at the end of training).
        eval_batch_size: examples per evaluation batch and process (default: `batch_size`).
        log_every: write a metrics record (and update the progress bar's numbers) every this many steps.
        checkpoint_every: save a checkpoint every this many steps (and always at the end when `output_dir` is
            set); None = only at the end.
        keep_last: how many step checkpoints to keep (older ones are deleted after a new one is complete).
        output_dir: folder for `metrics.jsonl` and `checkpoints/`; None writes nothing.
        seed: seeds the global RNGs (python, numpy, torch; + rank under torchrun) and the per-epoch data order
            (permutation seed = seed + epoch).
        resume: continue from the newest checkpoint in `output_dir/checkpoints` (a fresh start when there is
            none).
        num_workers: DataLoader worker processes for fetching/collating training examples.
        progress: show a tqdm progress bar (on rank 0, and only on a terminal).
        device: "cpu", "cuda", "cuda:1"...; None picks cuda:LOCAL_RANK when CUDA is available, else cpu.
        find_unused_parameters: passed to DistributedDataParallel; set it when some trainable parameters get
            no gradient in a step (the default False is faster and fits every adapter that is used in forward).
        sharding: how several processes (torchrun) share the work: "ddp" (every process holds the whole model,
            gradients are all-reduced: DistributedDataParallel) or "fsdp" (FSDP2 `fully_shard`: each process
            holds a slice of every parameter, gradient and optimizer state; `distributed.shard_model`). One
            process ignores it. Under "fsdp" the schedules and checkpoints see full tensors
            (`deltatune.train.sharding`); update rules: "adamw" and "loraplus".
        update_rule: how gradients become updates (`deltatune.optim.UPDATE_RULES`): "adamw" (default), "loraplus",
            "lora_pro", "lora_pro_light", "sam" or "mgpo"; built with `lr` and `weight_decay` above.
        update_rule_options: the rule's own options, e.g. {"ratio": 16} (loraplus), {"moments": "full"}
            (lora_pro), {"rho": 0.05, "base": "loraplus"} (sam), {"rho": 0.05, "mu": 0.9, "beta": 0.9} or
            {"profile": "nlg"} (mgpo); unknown names are refused when the Trainer
            builds the optimizer.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    eval_every_epoch: bool = True
    eval_batch_size: int | None = None
    log_every: int = 10
    checkpoint_every: int | None = None
    keep_last: int = 2
    output_dir: str | None = None
    seed: int = 0
    resume: bool = False
    num_workers: int = 0
    progress: bool = True
    device: str | None = None
    find_unused_parameters: bool = False
    sharding: str = "ddp"
    update_rule: str = "adamw"
    update_rule_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        self._check_lengths()
        self._check_optimization()
        self._check_outputs()

    def _check_lengths(self) -> None:
        config_check(_is_int(self.epochs) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        config_check(self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1), "max_steps",
                     self.max_steps, "None or an integer >= 1")
        config_check(_is_int(self.batch_size) and self.batch_size >= 1, "batch_size", self.batch_size,
                     "an integer >= 1 (the global batch across processes)")
        config_check(_is_int(self.grad_accum_steps) and 1 <= self.grad_accum_steps <= self.batch_size,
                     "grad_accum_steps", self.grad_accum_steps, f"an integer from 1 to batch_size={self.batch_size}",
                     "each micro-batch needs at least one example")
        config_check(self.eval_batch_size is None or (_is_int(self.eval_batch_size) and self.eval_batch_size >= 1),
                     "eval_batch_size", self.eval_batch_size, "None or an integer >= 1")
        config_check(_is_int(self.num_workers) and self.num_workers >= 0, "num_workers", self.num_workers,
                     "an integer >= 0")

    def _check_optimization(self) -> None:
        config_check(_is_number(self.lr) and self.lr > 0, "lr", self.lr, "a learning rate > 0")
        config_check(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                     "a number >= 0")
        config_check(_is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio",
                     self.warmup_ratio, "a number in [0, 1)")
        config_check(self.warmup_steps is None or (_is_int(self.warmup_steps) and self.warmup_steps >= 0),
                     "warmup_steps", self.warmup_steps, "None or an integer >= 0")
        config_check(self.warmup_steps is None or self.warmup_ratio == 0, "warmup_steps", self.warmup_steps,
                     "not set together with warmup_ratio", "give either warmup_steps or warmup_ratio")
        config_check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {SCHEDULES}")
        config_check(self.max_grad_norm is None or (_is_number(self.max_grad_norm) and self.max_grad_norm > 0),
                     "max_grad_norm", self.max_grad_norm, "None (no clipping) or a number > 0")
        self._check_update_rule()

    def _check_update_rule(self) -> None:
        from deltatune.optim.rules import available_update_rules  # optim imports core only; config stays light

        config_check(self.update_rule in available_update_rules(), "update_rule", self.update_rule,
                     f"one of {available_update_rules()}")
        config_check(self.update_rule_options is None or isinstance(self.update_rule_options, Mapping),
                     "update_rule_options", self.update_rule_options, "None or a dict of the rule's options")
        config_check(self.sharding in SHARDINGS, "sharding", self.sharding, f"one of {SHARDINGS}")
        config_check(self.sharding != "fsdp" or self.update_rule in FSDP_UPDATE_RULES, "update_rule",
                     self.update_rule, f"one of {FSDP_UPDATE_RULES} with sharding='fsdp'",
                     "use sharding='ddp' for this update rule")

    def _check_outputs(self) -> None:
        config_check(_is_int(self.log_every) and self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        config_check(self.checkpoint_every is None or (_is_int(self.checkpoint_every) and self.checkpoint_every >= 1),
                     "checkpoint_every", self.checkpoint_every, "None or an integer >= 1")
        config_check(_is_int(self.keep_last) and self.keep_last >= 1, "keep_last", self.keep_last, "an integer >= 1")
        config_check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        needs_folder = self.resume or self.checkpoint_every is not None
        config_check(self.output_dir is not None or not needs_folder, "output_dir", self.output_dir,
                     "a folder when resume=True or checkpoint_every is set", "pass output_dir='runs/my-run'")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up length in steps for a run of `total_steps` (ratio rounded up, as the HF Trainer does)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        # The tolerance keeps 0.1 * 30 (= 3.0000000000000004 in floating point) at 3 steps, not 4.
        return math.ceil(self.warmup_ratio * total_steps - 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

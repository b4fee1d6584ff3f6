"""The training loop: one explicit `for` over optimizer steps, in the spirit of nanoGPT's train.py.

    trainer = Trainer(model, TrainConfig(epochs=3, batch_size=32, lr=1e-3, output_dir="runs/a"), train, valid)
    result = trainer.train()          # TrainResult(global_step, metrics, history, checkpoint, ...)
    trainer.evaluate(test)            # {"loss": ..., "accuracy": ...}

The run's position (step, epoch, batch in the epoch, last evaluation and checkpoint) is `trainer.progress`,
a `TrainingProgress`; callbacks get it, and `trainer.state_dict()` carries it with the tensors.

Every step: on_step_begin -> for each micro-batch of this process: forward, loss (task loss weighted by the
micro-batch's share of the global batch, plus `regularization_loss(model)` once), backward (gradients sync
across processes on the last one) -> all-reduced loss, stop on NaN/inf -> on_backward_end -> clipping ->
optimizer.step (with a closure that recomputes the gradients, for rules that need one: SAM) -> scheduler.step ->
on_step_end -> log, epoch end (evaluation), checkpoint.

Under `torchrun --nproc_per_node=N` the same script trains with DistributedDataParallel, or sharded with FSDP2
under `TrainConfig(sharding="fsdp")`: `batch_size` stays the global batch, each process reads its share (see
`data_order`), only rank 0 writes files and shows progress. Sharded, the callbacks and checkpoints see full
tensors (`sharding.full_parameters`) and regularizers read gathered, differentiable ones.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from deltatune.core.model import set_training_mode
from deltatune.errors import ConfigError, TrainingError
from deltatune.optim.rules import NeedsClosure, PerturbsForward, build_update_rule
from deltatune.train import resume as resume_state
from deltatune.train.batches import SplitBatch, split_batch
from deltatune.train.callbacks import callback_states, check_callback_states, fire, load_callback_states
from deltatune.train.checkpoint import load_trainable_tensors, trainable_tensors
from deltatune.train.config import TrainConfig
from deltatune.train.data_order import (
    MicroBatch,
    epoch_permutation,
    global_batch,
    loader_seed,
    micro_batches,
    steps_per_epoch,
)
from deltatune.train.distributed import all_reduce_sum, average_replicated_gradients, setup_world, shard_model
from deltatune.train.evaluation import evaluate_model
from deltatune.train.losses import LossFn, batch_loss, is_zero_constant, regularization, takes_labels
from deltatune.train.metrics_log import MetricsLog, progress_bar
from deltatune.train.progress import TrainingProgress
from deltatune.train.schedules import build_scheduler
from deltatune.train.seeding import set_seed
from deltatune.train.sharding import differentiable_parameters, full_norm, full_parameters, sharded_like


@dataclass
class TrainResult:
    """What `Trainer.train` returns. `metrics`: the last training loss and the final evaluation (`eval_loss`, and
    `eval_accuracy` for one class label per example) when there is an eval dataset; `history`: every logged
    record."""

    global_step: int
    epoch: int
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    stopped_early: bool = False


class Trainer:
    """Trains the parameters of `model` that require gradients (see the module docstring for the loop).

    Args:
        model: called as `model(**batch_without_labels)` for dict batches, `model(*inputs)` for tuple batches
            (plus `labels=` when it computes its own loss, see `loss_fn`); returns logits (B, C), an object with
            `.logits`, or whatever `loss_fn` reads. It is moved to the training device.
        config: a `TrainConfig`.
        train_dataset / eval_dataset: map-style datasets whose items collate to a dict of tensors with `labels`
            or to a tuple `(inputs..., labels)` (a `TensorDataset(x, y)` works as it is).
        collate_fn: list of items -> batch (default `torch.utils.data.default_collate`).
        loss_fn: `loss_fn(outputs, labels)` -> the batch-mean loss (a 0-dim tensor), `outputs` being what the model
            returned; the model is then called without labels. Default: the model's own `.loss` when its forward
            takes `labels` (transformers' causal LMs and classifiers), else classification cross-entropy of the
            logits (`deltatune.train.losses` has the rules; `causal_lm_loss` is there for LMs that do not
            compute a loss). Evaluation uses the same loss.
        callbacks: objects with any of the hooks of `deltatune.train.Callback`, fired in this order; they get the
            run's `progress` (a `TrainingProgress`), not the trainer (see `deltatune.train.callbacks`).
        optimizer_factory: `factory(param_groups) -> torch.optim.Optimizer` replaces the optimizer of
            `config.update_rule` (AdamW by default; `deltatune.optim.UPDATE_RULES`). It gets one group
            {"params", "param_names", "lr": config.lr}; the group's lr wins over the factory's own. An optimizer
            that declares `needs_closure = True` (SAM) gets `step(closure)`, the closure recomputing the batch's
            loss and clipped gradients at the current parameters; one that declares `perturbs_forward = True`
            (MGPO) gets the step's forward and backward run inside its `perturbed()` context.

    `trainer.progress` is where the run is (step, epoch, data position, last evaluation and checkpoint);
    `state_dict()` / `load_state_dict()` carry everything but the process RNG for an exact continuation, and
    checkpoints (`deltatune.train.resume`) are that state in files.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_dataset: Dataset,
                 eval_dataset: Dataset | None = None, *, collate_fn: Callable[[list], dict] | None = None,
                 loss_fn: LossFn | None = None, callbacks: Sequence[Any] = (),
                 optimizer_factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"config is a {type(config).__name__}; expected a deltatune.train.TrainConfig")
        self.config = config
        self.world = setup_world(config.device)
        self.model = model.to(self.world.device)
        self._sharded = self.world.distributed and config.sharding == "fsdp"
        if self._sharded:
            shard_model(self.model)  # before the optimizer is built: sharding replaces the parameters
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate_fn = collate_fn or default_collate
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(f"loss_fn is a {type(loss_fn).__name__}; expected a function (outputs, labels) -> "
                              "0-dim loss tensor, or None for the default")
        self.loss_fn = loss_fn
        self._labels_to_model = loss_fn is None and takes_labels(self.model)
        self.callbacks = list(callbacks)
        self._check_data()
        self.optimizer = self._build_optimizer(optimizer_factory)
        per_epoch = steps_per_epoch(len(train_dataset), config.batch_size)
        self.progress = TrainingProgress(total_steps=config.max_steps or config.epochs * per_epoch,
                                         steps_per_epoch=per_epoch)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, self.total_steps,
                                         config.warmup_for(self.total_steps))
        self.log = MetricsLog(config.output_dir, write=self.world.is_main)
        self._train_model = self._wrap_distributed()

    # --- set-up -------------------------------------------------------------------------------------------
    def _check_data(self) -> None:
        if len(self.train_dataset) == 0:
            raise TrainingError("the training dataset is empty; expected at least one example")
        if self.config.batch_size < self.world.size:
            raise ConfigError(f"batch_size={self.config.batch_size} is smaller than the {self.world.size} "
                              "processes; batch_size is the global batch: raise it to at least the world size")

    def _build_optimizer(self, factory: Callable | None) -> torch.optim.Optimizer:
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise TrainingError("the model has no trainable parameter; adapt it (deltatune.adapt) or set "
                                "requires_grad=True on the parameters to train")
        if factory is None:
            options = dict(self.config.update_rule_options or {})
            return build_update_rule(self.config.update_rule, self.model, lr=self.config.lr,
                                     weight_decay=self.config.weight_decay, **options)
        if self.config.update_rule != "adamw" or self.config.update_rule_options:
            raise ConfigError(f"both optimizer_factory and TrainConfig(update_rule={self.config.update_rule!r}) were "
                              "given; pass one of them")
        groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named], "lr": self.config.lr}]
        optimizer = factory(groups)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TrainingError(f"optimizer_factory returned a {type(optimizer).__name__}; expected a "
                                "torch.optim.Optimizer built from the parameter groups it was given")
        return optimizer

    def _wrap_distributed(self) -> nn.Module:
        if not self.world.distributed or self._sharded:
            return self.model
        device_ids = [self.world.device.index] if self.world.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids,
                                                   find_unused_parameters=self.config.find_unused_parameters)

    @property
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # The progress fields the trainer has always exposed (read-only: the loop advances `progress`).
    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.progress.batch_in_epoch

    @property
    def total_steps(self) -> int:
        return self.progress.total_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.progress.steps_per_epoch

    @property
    def last_checkpoint(self) -> Path | None:
        return self.progress.last_checkpoint

    def request_stop(self) -> None:
        """Stop after the current step (final checkpoint and evaluation still happen; resumable)."""
        self.progress.request_stop()

    def hook_context(self) -> dict[str, Any]:
        return dict(progress=self.progress, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                    global_step=self.global_step, epoch=self.epoch)

    def _fire(self, hook: str, **extra: Any) -> None:
        readers = self._readers(hook)
        frozen = any(getattr(callback, "reads_base_weights", False) for callback in readers)
        with self._full_tensors(frozen) if readers else contextlib.nullcontext():
            fire(self.callbacks, hook, trainer=self, **extra, **self.hook_context())

    def _readers(self, hook: str) -> list[Any]:
        """Sharded: the callbacks with this hook that read parameters (a callback that does not, a logger,
        declares `reads_full_tensors = False`; one that scores the frozen weights declares
        `reads_base_weights = True`). Empty when not sharded."""
        if not self._sharded:
            return []
        return [callback for callback in self.callbacks
                if hasattr(callback, hook) and getattr(callback, "reads_full_tensors", True)]

    def _full_tensors(self, frozen: bool = False) -> contextlib.AbstractContextManager[None]:
        """Full parameters (the frozen ones too with `frozen`), gradients and optimizer state inside (a
        collective; a no-op unless sharded)."""
        if not self._sharded:
            return contextlib.nullcontext()
        return full_parameters(self.model, self.optimizer, frozen=frozen)

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything this run needs to continue exactly, except the process RNG (a checkpoint adds it):
        {"progress", "model" (trainable tensors and buffers), "optimizer", "scheduler", "callbacks"}. The
        tensors are the live ones, not copies (sharded: gathered full copies, a collective every process calls)."""
        with self._full_tensors():
            return {"progress": self.progress.state_dict(), "model": trainable_tensors(self.model),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "callbacks": callback_states(self.callbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict` (same model, adapters and callbacks); `train()` then continues from it."""
        self._load_state(state, "the trainer state")

    def _load_state(self, state: dict[str, Any], source: str) -> None:
        check_callback_states(self.callbacks, state["callbacks"], source)  # before anything is overwritten
        model_tensors = sharded_like(self.model, state["model"]) if self._sharded else state["model"]
        load_trainable_tensors(self.model, model_tensors, source)
        with self._full_tensors():  # sharded: full tensors in, each process keeps its slice on leaving
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            load_callback_states(self.callbacks, state["callbacks"], source)
        self.progress.load_state_dict(state["progress"])

    # --- the loop -----------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train until `total_steps` (or a callback's `request_stop`); resume first when config.resume."""
        set_seed(self.config.seed + self.world.rank)
        resumed = self._resume() if self.config.resume else None
        self.log.start(self.global_step if resumed else None)
        set_training_mode(self._train_model)  # model.train(), or frozen modules kept in eval (KeepsBaseInEval)
        self._fire("on_train_begin")
        bar = progress_bar(self.total_steps, self.global_step, self.config.progress and self.world.is_main)
        try:
            while not self.progress.finished and not self.progress.stop_requested:
                self._run_epoch(bar)
        finally:
            bar.close()
        return self._finish()

    def _resume(self) -> Path | None:
        folder = resume_state.restore_latest(self.config, self.world, len(self.train_dataset), self._load_state)
        if folder is not None:
            self.progress.saved(folder)
        return folder

    def _run_epoch(self, bar: Any) -> None:
        permutation = epoch_permutation(len(self.train_dataset), self.config.seed, self.epoch)
        batches = [global_batch(permutation, self.config.batch_size, b)
                   for b in range(self.batch_in_epoch, self.steps_per_epoch)]
        plans = [micro_batches(batch, self.world.rank, self.world.size, self.config.grad_accum_steps)
                 for batch in batches]
        loaded = iter(self._loader(plans))
        for batch, plan in zip(batches, plans):
            started = time.perf_counter()  # throughput counts data loading too
            self._optimizer_step(plan, [next(loaded) for _ in plan], len(batch), started)
            epoch_done = self.progress.batch_done()
            bar.update(1)
            self._log_if_due(bar)
            if epoch_done:
                self._end_epoch()
            if self.config.checkpoint_every and self.global_step % self.config.checkpoint_every == 0:
                self.save_checkpoint()
            if self.progress.finished or self.progress.stop_requested:
                return

    def _loader(self, plans: list[list[MicroBatch]]) -> DataLoader:
        # A private generator: creating the loader must not draw from the global torch RNG (that would shift
        # dropout masks after a resume). Worker seeds derive from it, deterministically per epoch position.
        generator = torch.Generator().manual_seed(loader_seed(self.config.seed, self.epoch, self.batch_in_epoch))
        sampler = [list(micro.indices) for plan in plans for micro in plan]
        return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                          num_workers=self.config.num_workers, generator=generator,
                          pin_memory=self.world.device.type == "cuda")

    def _optimizer_step(self, plan: list[MicroBatch], batches: list[dict], global_size: int, started: float) -> None:
        self._fire("on_step_begin")
        with self._gradient_pass():
            loss = self._global_loss(self._accumulate_gradients(plan, batches))
        self._fire("on_backward_end")
        grad_norm = self._clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        if isinstance(self.optimizer, NeedsClosure) and self.optimizer.needs_closure:
            self.optimizer.step(lambda: self._recompute_gradients(plan, batches))
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.progress.step_done()
        self.progress.interval.add(loss, global_size, time.perf_counter() - started, lr, grad_norm)
        self._fire("on_step_end")
        self._agree_on_stop()

    def _gradient_pass(self) -> contextlib.AbstractContextManager[None]:
        """Where the step's forward and backward run: inside `optimizer.perturbed()` for an optimizer that
        declares `perturbs_forward = True` (`deltatune.optim.PerturbsForward`: MGPO), else as they are."""
        if isinstance(self.optimizer, PerturbsForward) and self.optimizer.perturbs_forward:
            return self.optimizer.perturbed()
        return contextlib.nullcontext()

    def _accumulate_gradients(self, plan: list[MicroBatch], batches: list[dict]) -> float:
        """Zero the gradients, then backward every micro-batch of this process; returns this process's loss."""
        self.optimizer.zero_grad(set_to_none=True)
        local_loss = 0.0
        for micro, batch in zip(plan, batches):
            sync = micro.last or not self.world.distributed
            with contextlib.nullcontext() if sync else self._no_sync():
                local_loss += self._forward_backward(micro, batch)
        if self._sharded:
            average_replicated_gradients(self.model, self.world)  # the scalars FSDP cannot shard
        return local_loss

    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        """Accumulate this micro-batch's gradients locally; they are reduced with the last one's."""
        if not self._sharded:
            with self._train_model.no_sync():
                yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _recompute_gradients(self, plan: list[MicroBatch], batches: list[dict]) -> float:
        """The closure given to a `NeedsClosure` optimizer (SAM's second pass): the same global batch's loss and
        gradients at the current parameters, clipped like the first pass's."""
        loss = self._global_loss(self._accumulate_gradients(plan, batches))
        self._clip_gradients()
        return loss

    def _forward_backward(self, micro: MicroBatch, batch: Any) -> float:
        """Backward of this micro-batch's part of the global objective; returns that part's value."""
        batch = self._to_device(batch)
        try:
            loss, _ = batch_loss(self._train_model, batch, self.loss_fn, self._labels_to_model)
        except RuntimeError as error:
            if "find_unused_parameters" in str(error):
                raise TrainingError("some trainable parameters got no gradient in the last step; set "
                                    "TrainConfig(find_unused_parameters=True) or freeze them") from error
            raise
        part = loss * micro.weight
        if micro.last:
            with differentiable_parameters(self.model) if self._sharded else contextlib.nullcontext():
                reg = regularization(self.model)
            if not is_zero_constant(reg):
                # Added once per process; DDP averages the identical copies back to one regularizer. Sharded,
                # the term is computed on gathered tensors and its gradient reaches each slice unaveraged
                # (the gather's backward takes the slice), so reg / size * size = the regularizer's gradient too.
                part = part + reg / self.world.size
        # DDP and FSDP average gradients over processes; scaling by the world size turns that average into the
        # sum of the micro-batch parts, i.e. the gradient of the global-batch mean.
        (part * self.world.size).backward()
        return float(part.detach())

    def _global_loss(self, local_loss: float) -> float:
        loss = float(all_reduce_sum(torch.tensor([local_loss], dtype=torch.float64, device=self.world.device),
                                    self.world))
        if not math.isfinite(loss):
            raise TrainingError(self._nonfinite_message("loss", loss))
        return loss

    def _clip_gradients(self) -> float | None:
        if self.config.max_grad_norm is None:
            return None
        norm = float(full_norm(torch.nn.utils.clip_grad_norm_(self.trainable_parameters, self.config.max_grad_norm)))
        if not math.isfinite(norm):
            raise TrainingError(self._nonfinite_message("gradient norm", norm))
        return norm

    def _nonfinite_message(self, what: str, value: float) -> str:
        kept = f"last good checkpoint {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint written"
        return (f"{what} became {value} at step {self.global_step + 1} (epoch {self.epoch}); training stopped "
                f"before the update ({kept}); lower the learning rate (lr={self.config.lr}), enable gradient "
                "clipping (max_grad_norm), or check the data for NaN/inf inputs and out-of-range labels")

    def _agree_on_stop(self) -> None:
        if self.world.distributed:
            flag = torch.tensor([float(self.progress.stop_requested)], device=self.world.device)
            self.progress.stop_requested = bool(all_reduce_sum(flag, self.world).item() > 0)

    def _to_device(self, batch: Any) -> SplitBatch:
        return split_batch(batch).to(self.world.device)

    # --- logging, epochs, evaluation ----------------------------------------------------------------------
    def _log_if_due(self, bar: Any) -> None:
        due = self.global_step % self.config.log_every == 0 or self.progress.finished
        if not (due or self.progress.stop_requested):
            return
        record = {"step": self.global_step, "epoch": self.progress.epoch_fraction, **self.progress.interval.summary()}
        self.log.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        samples_s=f"{record['samples_per_second']:.1f}", refresh=False)

    def _end_epoch(self) -> None:
        if self.eval_dataset is not None and self.config.eval_every_epoch:
            self._evaluate_and_log()
        self._fire("on_epoch_end")
        self.progress.next_epoch()

    def _evaluate_and_log(self) -> dict[str, float]:
        metrics = self.evaluate(self.eval_dataset)
        self.log.write({"step": self.global_step, "epoch": self.progress.epoch_fraction,
                        **{f"eval_{name}": value for name, value in metrics.items()}})
        self.progress.evaluated(metrics)
        self._fire("on_evaluate", metrics=metrics)
        return metrics

    def evaluate(self, dataset: Dataset | None = None) -> dict[str, float]:
        """Mean loss (the task loss, no regularizer) and, for one class label per example, accuracy over
        `dataset` (default: the eval dataset), shared out across processes (see `evaluation.evaluate_model`)."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None or len(dataset) == 0:
            raise TrainingError("evaluate() needs a non-empty dataset; pass one or give the Trainer eval_dataset")
        return evaluate_model(self.model, dataset, self.collate_fn, self.loss_fn, self.world,
                              self.config.eval_batch_size or self.config.batch_size, self._to_device,
                              self._labels_to_model, lockstep=self._sharded)

    # --- checkpoints and the end --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step into output_dir/checkpoints (rank 0; every rank must call)."""
        if self.config.output_dir is None:
            return None
        folder = resume_state.save(self.state_dict, self.config, self.world, len(self.train_dataset))
        self.progress.saved(folder)
        return folder

    def _final_evaluation(self) -> dict[str, float]:
        """This step's evaluation: the one already run, or a new one (logged unless a resumed run logged it)."""
        if self.progress.last_eval_step != self.global_step:
            return self._evaluate_and_log()
        if self.progress.last_eval_metrics is None:  # resumed at the very step that was evaluated: in the log
            self.progress.last_eval_metrics = self.evaluate(self.eval_dataset)
        return self.progress.last_eval_metrics

    def _finish(self) -> TrainResult:
        metrics: dict[str, float] = {}
        if self.log.history:
            losses = [r["loss"] for r in self.log.history if "loss" in r]
            metrics.update({"train_loss": losses[-1]} if losses else {})
        if self.eval_dataset is not None:
            metrics.update({f"eval_{name}": value for name, value in self._final_evaluation().items()})
        if self.config.output_dir is not None and self.progress.last_saved_step != self.global_step:
            self.save_checkpoint()
        self._fire("on_train_end")
        return TrainResult(self.global_step, self.epoch, metrics, list(self.log.history), self.last_checkpoint,
                           stopped_early=self.global_step < self.total_steps)

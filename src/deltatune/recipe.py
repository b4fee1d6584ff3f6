"""The fine-tuning recipe behind `deltatune train`, `deltatune demo` and the benchmarks.

One call trains a built-in task's model with a registered method (or the two reference points: a frozen
backbone with a trained head, "probe", and full fine-tuning, "full"), evaluates it and saves the adapter.
With `checkpoint_every` it checkpoints during training; `resume=True` continues the newest complete checkpoint
in `out_dir` exactly (an interrupted run resumed ends bit-identical to one that never stopped). Every checkpoint
records the run's settings, and a resume with other settings is refused.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import deltatune as dt
from deltatune.core.layers import MODULE
from deltatune.core.model import ParameterCount
from deltatune.errors import AdapterFileError, ConfigError, TrainingError

PROBE, FULL = "probe", "full"
# Learning rates chosen on the wordnet-nouns validation split (AdamW, batch 32, 2 epochs).
DEFAULT_LR = {PROBE: 5e-3, FULL: 5e-5}
DEFAULT_METHOD_LR = 2e-3


@dataclass
class FinetuneResult:
    """One run's outcome. `test_score` / `validation_score` are the task's metric (`metric`: "accuracy" for the
    classification tasks, e.g. a Fréchet distance or a similarity for generative ones)."""

    task: str
    method: str
    test_score: float
    validation_score: float
    trainable: ParameterCount
    seconds: float
    adapter_path: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    metric: str = "accuracy"
    higher_is_better: bool = True
    model: Any = field(default=None, repr=False)  # the trained model (adapted, or the probe / full model)

    @property
    def test_accuracy(self) -> float:
        return self._accuracy(self.test_score)

    @property
    def validation_accuracy(self) -> float:
        return self._accuracy(self.validation_score)

    def _accuracy(self, score: float) -> float:
        if self.metric != "accuracy":
            raise ConfigError(f"task {self.task!r} is scored by {self.metric}, not accuracy: read test_score / "
                              "validation_score")
        return score

    def line(self) -> str:
        return (f"{self.method:>8}  test {self.metric} {self.test_score:.4f}  "
                f"trainable {self.trainable.trainable:,} ({100 * self.trainable.share:.3f}%)  {self.seconds:.0f} s")


def build_config(method: str, params: dict[str, Any], task) -> dt.DeltaConfig:
    """A method's config from user parameters, with the task's head trained and its default targets (if it
    has some) adapted. The task's targets name layers: a method that acts on whole modules (layer kind
    MODULE: prompts, VPT) keeps its own targets."""
    params = dict(params)
    params.setdefault("extra_trainable", tuple(task.extra_trainable))
    if task.default_targets is not None and MODULE not in dt.method_entry(method).delta_cls.layer_kinds:
        params.setdefault("targets", tuple(task.default_targets))
    return dt.config_for(method, **params)


def training_batches(task, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
    """Training batches in a seeded order, built lazily (a method's planning stage reads only a few)."""
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), batch_size):
        yield task.collate([task.train[i] for i in order[start:start + batch_size]])


def prepare_model(task, method: str, params: dict[str, Any], seed: int, batch_size: int = 32,
                  init_from: str | Path | None = None):
    """A fresh task model, adapted (or frozen / fully trainable for the reference points); a method with a
    planning stage (SPT) plans on training batches first. `init_from`: a saved adapter whose tensors start the
    new one (`deltatune.adapt`; PVP)."""
    torch.manual_seed(seed)
    model = task.build_model()
    if method == FULL:
        model.requires_grad_(True)
        return model, None
    if method == PROBE:
        model.requires_grad_(False)
        for name in task.extra_trainable:
            model.get_submodule(name).requires_grad_(True)
        return model, None
    config = build_config(method, params, task).plan(model, training_batches(task, batch_size, seed))
    return dt.adapt(model, config, init_from=init_from), config


class RunSettings:
    """A stateful training callback (it does nothing per step) that stores the settings shaping a run in every
    checkpoint, so that a resume can refuse a checkpoint written for another method, config or schedule."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = _plain(settings)

    def state_dict(self) -> dict[str, str]:
        return {"settings": json.dumps(self.settings, sort_keys=True)}

    def load_state_dict(self, state: dict[str, str]) -> None:
        check_same_settings(json.loads(state["settings"]), self.settings, "the checkpoint")


def _plain(value: Any) -> Any:
    """JSON's view of `value` (tuples become lists), so saved and current settings compare equal."""
    return json.loads(json.dumps(value, default=list))


def check_same_settings(saved: dict[str, Any], current: dict[str, Any], source: str) -> None:
    saved, current = _flat(saved), _flat(current)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise TrainingError(f"{source} was written for {key}={saved.get(key)!r} but this run has "
                                f"{key}={current.get(key)!r}; resume with the same settings, or train into another "
                                "output folder")


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """{"config": {"rank": 8}} -> {"config.rank": 8}: a difference is named by its field."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in _flat(value).items()})
        else:
            flat[key] = value
    return flat


def check_resumable(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse `resume` when out_dir holds no complete checkpoint, or only one of another run's settings."""
    from deltatune.train.callbacks import callback_key
    from deltatune.train.checkpoint import STATE_FILE, checkpoints_root, latest_checkpoint

    root = checkpoints_root(out_dir)
    folder = latest_checkpoint(root)
    if folder is None:
        raise TrainingError(f"resume: {root} holds no complete checkpoint; train without resume to start "
                            "(checkpoint_every / --checkpoint-every saves during training)")
    try:
        callbacks = json.loads((folder / STATE_FILE).read_text()).get("callbacks", {})
    except (OSError, ValueError, AttributeError) as error:
        raise AdapterFileError(f"checkpoint {folder} is unreadable ({error}); delete it to resume from the "
                               "previous one") from None
    key = callback_key(0, RunSettings(settings))  # finetune passes it as the first callback
    saved = callbacks.get(key, {}).get("settings") if isinstance(callbacks, dict) else None
    if saved is None:
        raise TrainingError(f"checkpoint {folder} holds no run settings (it was not written by `deltatune train`); "
                            "resume it with the Trainer that wrote it, or train into another output folder")
    check_same_settings(json.loads(saved), _plain(settings), f"checkpoint {folder}")


def run_settings(task: str, method: str, config: dt.DeltaConfig | None, train_config: Any,
                 max_length: int, train_size: int | None) -> dict[str, Any]:
    """What shapes the result: task and data, method and its (unplanned) config, the training schedule."""
    schedule = {name: getattr(train_config, name) for name in ("epochs", "max_steps", "batch_size", "lr", "seed")}
    return {"task": task, "method": method, "config": config.to_dict() if config is not None else None,
            "max_length": max_length, "train_size": train_size, **schedule}


def evaluation_subsets(task, validation_size: int | None, test_size: int | None):
    """The task with its validation and test splits cut to fixed label-stratified subsets of at most these sizes
    (None, or a size the split does not exceed, keeps the split whole)."""
    import dataclasses

    from deltatune.data.task import limit_train_size

    cut = {name: limit_train_size(task.split(name), size, 0) for name, size in
           (("validation", validation_size), ("test", test_size))
           if size is not None and size < len(task.split(name))}
    return dataclasses.replace(task, **cut) if cut else task


def finetune(
    task: str = "wordnet-nouns",
    method: str = "lora",
    params: dict[str, Any] | None = None,
    *,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float | None = None,
    max_length: int = 32,
    train_size: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    callbacks: tuple = (),
    optimizer_factory=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    validation_size: int | None = None,
    test_size: int | None = None,
    init_from: str | Path | None = None,
    update_rule: str = "adamw",
    update_rule_options: dict[str, Any] | None = None,
    sharding: str = "ddp",
) -> FinetuneResult:
    """Train `method` on `task`, report the validation and test score (the task's metric), and save the
    adapter in out_dir/adapter.

    checkpoint_every: also checkpoint every this many optimizer steps (out_dir/checkpoints; the last is always
    written). resume: continue from the newest complete checkpoint in out_dir, which must have been written
    with the same settings (task, method, config, schedule, seed). validation_size / test_size: evaluate on a
    fixed label-stratified subset of at most that many examples (drawn with seed 0 whatever `seed` is), for
    quick benchmarks. init_from: start the adapter from a saved one's tensors (PVP: prompts pre-trained on a
    source task). update_rule / update_rule_options: how gradients become updates (`deltatune.optim`;
    `TrainConfig.update_rule`). sharding: "ddp" or "fsdp" under torchrun (`TrainConfig.sharding`); rank 0
    writes the complete adapter."""
    from deltatune.data import load_task
    from deltatune.train import TrainConfig, Trainer
    from deltatune.train.sharding import save_full_adapter

    if epochs <= 0:
        raise ConfigError(f"epochs={epochs} is invalid: expected an integer > 0")
    train_config = TrainConfig(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, seed=seed,
        lr=lr or DEFAULT_LR.get(method, DEFAULT_METHOD_LR), checkpoint_every=checkpoint_every, resume=resume,
        output_dir=str(out_dir) if out_dir else None, progress=progress, update_rule=update_rule,
        update_rule_options=update_rule_options, sharding=sharding,
    )
    data = evaluation_subsets(load_task(task, max_length=max_length, train_size=train_size, seed=seed),
                              validation_size, test_size)
    settings = run_settings(task, method, build_config(method, params or {}, data) if method not in (PROBE, FULL)
                            else None, train_config, max_length, train_size)
    if validation_size is not None:  # only when set, so checkpoints written before these options still resume
        settings["validation_size"] = validation_size
    if resume:
        check_resumable(Path(out_dir), settings)
    model, config = prepare_model(data, method, params or {}, seed, batch_size, init_from=init_from)
    steps = max_steps or epochs * -(-len(data.train) // batch_size)
    method_callbacks = config.training_callbacks(model, steps) if config is not None else []
    trainer = Trainer(model, train_config, data.train, data.validation, collate_fn=data.collate,
                      callbacks=(RunSettings(settings), *method_callbacks, *callbacks),
                      optimizer_factory=optimizer_factory)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    adapter_path = None
    if out_dir is not None and config is not None:
        adapter_path = save_full_adapter(model, Path(out_dir) / "adapter", trainer.world)
    # For accuracy, the trainer's final evaluation already ran on the validation split with the final weights.
    validation = result.metrics["eval_accuracy"] if data.scorer is None else data.score(model, data.validation)
    return FinetuneResult(
        task=task, method=method, test_score=data.score(model, data.test), validation_score=validation,
        trainable=dt.trainable_parameters(model), seconds=seconds, adapter_path=adapter_path,
        history=list(getattr(result, "history", [])), metric=data.metric,
        higher_is_better=data.higher_is_better, model=model,
    )

"""Scoring a merged state dict on a built-in task's validation split: the objectives of `deltatune merge --search`.

An evaluation is written `TASK[:METRIC][,option=value...]`, e.g.::

    glyphs-novel-vit                                  # the task's own metric (accuracy) on its validation split
    wordnet-nouns:loss,prefix=backbone.,head=nouns.head.safetensors,size=300
    glyphs-novel-vit:output_change,reference=./novel  # unlabelled: DAREx-q's objective, no labels read

Metrics (each turned into a score where higher is better):

| metric | data | score |
| --- | --- | --- |
| the task's own (`accuracy` for classifiers) | labelled | the metric (negated if lower is better) |
| `loss` | labelled | − mean cross-entropy of the logits |
| `entropy` | unlabelled | − mean entropy of the predicted class distribution |
| `output_change` | unlabelled | − mean |logits − reference logits| (DAREx-q, Deng et al. 2025, Fig. 1) |

Options: `size=N` scores the first N validation examples (default: all); `prefix=P` puts the merged tensors
under module path P of the task's model (e.g. `backbone.` when the checkpoints are a backbone only);
`head=PATH` loads the task's own head (`task.extra_trainable`) from a safetensors file or folder, with keys
either relative to the head module or full; `reference=PATH` is the checkpoint whose outputs `output_change`
compares with (keys as the merged checkpoint's, e.g. one of the fine-tunes); `max_length=N` for text tasks.
Every key of the task's model must come from the merge or the head, and every merged key must fit the model:
otherwise the first mismatch is named. Only the validation split is ever read: choosing on test data leaks.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.merging.search.darex_q import output_change

LABELLED, UNLABELLED = ("loss",), ("entropy", "output_change")
OPTIONS = ("size", "prefix", "head", "reference", "max_length")


@dataclass(frozen=True)
class EvalSpec:
    """One parsed `--eval`: task, metric (None: the task's own) and options."""

    task: str
    metric: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.task}:{self.metric}" if self.metric else self.task


def parse_eval(text: str) -> EvalSpec:
    """`TASK[:METRIC][,option=value...]` -> EvalSpec (options checked by name; values by `TaskObjective`)."""
    head, *items = [part.strip() for part in text.split(",")]
    task, _, metric = head.partition(":")
    if not task:
        raise ConfigError(f"--eval {text!r}: expected TASK[:METRIC][,option=value...], e.g. "
                          "glyphs-novel-vit:accuracy,size=300")
    options = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or key not in OPTIONS:
            raise ConfigError(f"--eval {text!r}: option {item!r} is not one of {', '.join(o + '=' for o in OPTIONS)}")
        options[key] = value
    return EvalSpec(task, metric or None, options)


def _read_tensors(path: str, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    location = Path(path)
    files = sorted(location.glob("*.safetensors")) if location.is_dir() else [location]
    if not files or not all(f.is_file() for f in files):
        raise ConfigError(f"{what}={path}: no safetensors file there; give a .safetensors file or a folder of them")
    tensors: dict[str, Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _int_option(spec: EvalSpec, name: str) -> int | None:
    if name not in spec.options:
        return None
    try:
        value = int(spec.options[name])
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--eval {spec.label}: {name}={spec.options[name]!r} is invalid: expected an integer >= 1")
    return value


class TaskObjective:
    """One task's model and validation data, scoring merged state dicts (see the module docstring)."""

    def __init__(self, spec: EvalSpec) -> None:
        from deltatune.data import load_task

        self.spec = spec
        max_length = _int_option(spec, "max_length")
        self.task = load_task(spec.task, **({"max_length": max_length} if max_length else {}))
        self.metric = spec.metric or self.task.metric
        allowed = (self.task.metric, *LABELLED, *UNLABELLED)
        if self.metric not in allowed:
            raise ConfigError(f"--eval {spec.label}: unknown metric {self.metric!r} for task {spec.task}; expected "
                              f"one of {', '.join(allowed)}")
        if (self.metric == "output_change") != ("reference" in spec.options):
            raise ConfigError(f"--eval {spec.label}: reference=PATH goes with metric output_change (and only "
                              "with it): the checkpoint whose outputs the merge should keep")
        size = _int_option(spec, "size")
        validation = self.task.validation
        self.data = validation.subset(range(min(size, len(validation)))) if size else validation
        self.prefix = spec.options.get("prefix", "")
        torch.manual_seed(0)  # a fresh head's draw; every key is overwritten below anyway
        self.model = self.task.build_model()
        self.head = self._head_tensors(spec.options["head"]) if "head" in spec.options else {}
        self.reference = None
        if self.metric == "output_change":
            self.reference = self.logits(_read_tensors(spec.options["reference"], "reference"))

    def _head_tensors(self, path: str) -> dict[str, Tensor]:
        modules = self.task.extra_trainable
        if len(modules) != 1:
            raise ConfigError(f"--eval {self.spec.label}: head= needs a task with one head module; "
                              f"{self.spec.task} has {list(modules) or 'none'}")
        module = modules[0]
        tensors = _read_tensors(path, "head")
        full = {k: v for k, v in tensors.items() if k.startswith(f"{module}.")}  # a whole model's checkpoint
        return full or {f"{module}.{k}": v for k, v in tensors.items()}  # a head module's own state dict

    def _state(self, merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
        expected = self.model.state_dict()
        state = {self.prefix + k: v for k, v in merged.items()}
        state.update(self.head)
        unknown = [k for k in state if k not in expected]
        if unknown:
            raise ConfigError(f"--eval {self.spec.label}: tensor {unknown[0]!r} is not in the {self.spec.task} "
                              f"model (its keys look like {next(iter(expected))!r}); set prefix= so the names fit")
        missing = [k for k in expected if k not in state]
        if missing:
            raise ConfigError(f"--eval {self.spec.label}: the {self.spec.task} model's {missing[0]!r} comes from "
                              "neither the merge nor head=; give head=PATH (the task's own head) or merge it")
        wrong = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
        if wrong:
            raise ConfigError(f"--eval {self.spec.label}: {wrong[0]!r} has shape {tuple(state[wrong[0]].shape)}, "
                              f"the model's is {tuple(expected[wrong[0]].shape)}")
        return state

    def _load(self, merged: Mapping[str, Tensor]) -> nn.Module:
        self.model.load_state_dict(self._state(merged))
        return self.model

    @torch.no_grad()
    def logits(self, merged: Mapping[str, Tensor]) -> Tensor:
        from deltatune.train.evaluation import model_logits

        logits = model_logits(self._load(merged), self.data)
        if logits.dim() != 2:
            raise ConfigError(f"--eval {self.spec.label}: metric {self.metric} needs a classifier (logits of shape "
                              f"[batch, classes]); use the task's own metric {self.task.metric}")
        return logits

    def value(self, merged: Mapping[str, Tensor]) -> float:
        """The metric itself (accuracy, loss, entropy or output change) of the merged tensors."""
        if self.metric == self.task.metric:
            return float(self.task.score(self._load(merged), self.data))
        logits = self.logits(merged)
        if self.metric == "loss":
            return float(nn.functional.cross_entropy(logits, self.data.tensors["labels"]))
        if self.metric == "entropy":
            log_p = logits.log_softmax(dim=-1)
            return float(-(log_p.exp() * log_p).sum(dim=-1).mean())
        return output_change(self.reference, logits)

    def score(self, merged: Mapping[str, Tensor]) -> tuple[float, float]:
        """(score: higher is better, the metric's value)."""
        value = self.value(merged)
        better_high = self.task.higher_is_better if self.metric == self.task.metric else False
        return (value if better_high else -value), value


def evaluation_objective(specs: Sequence[str]):
    """merged state dict -> (mean score over the evaluations, {evaluation label: metric value})."""
    if not specs:
        raise ConfigError("--search needs at least one --eval TASK[:METRIC][,...] to score the merges on")
    objectives = [TaskObjective(parse_eval(text)) for text in specs]

    def objective(merged: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
        scored = [(o.spec.label, *o.score(merged)) for o in objectives]
        return sum(s for _, s, _ in scored) / len(scored), {label: value for label, _, value in scored}

    return objective

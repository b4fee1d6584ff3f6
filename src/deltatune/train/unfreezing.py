"""Progressive unfreezing: layer groups (or their adapters) join training one at a time, from the output down.

Isong (arXiv 2501.15547) trains the new top layers first, then unfreezes the transferred layers one at a time
from the last toward the input, fine-tuning after each. The paper gives no interval or grouping; ours:

- groups g_1 (nearest the input) ... g_K (nearest the output): parameter-name prefixes, e.g. `blocks.0` ...
  `blocks.3` (`child_prefixes(model, "blocks")`, or any list of names);
- stage 0 trains only the trainable parameters in no group (the head, new layers); stage s >= 1 also trains
  g_K ... g_(K-s+1); stage K trains everything that was trainable;
- the stage advances every `every` epochs or steps, or at the listed `milestones` (stage s starts at
  milestones[s-1]).

The groups are cut from the parameters that are trainable when the schedule starts, so the same schedule
serves full fine-tuning (every parameter trainable: whole layers thaw) and any delta method (only the deltas
are trainable: the adapters of layers nearer the input join later). Freezing is `requires_grad = False`: a frozen
parameter gets no gradient (the Trainer zeroes gradients to None), so torch's optimizers skip it: no update,
no weight decay, no optimizer state until it thaws, and nothing already trained is reset. The optimizer is
built once over every trainable parameter (do not build it after freezing). BatchNorm running statistics of
frozen layers still follow the data in train mode, as in the usual recipe. Under DistributedDataParallel set
`TrainConfig(find_unused_parameters=True)` (the trainable set changes during training).

    from deltatune.train import ProgressiveUnfreezing, Trainer
    from deltatune.train.unfreezing import child_prefixes
    unfreeze = ProgressiveUnfreezing(model, child_prefixes(model, "blocks"), every=2, unit="epoch")
    Trainer(model, config, train, valid, callbacks=[unfreeze]).train()

A plain loop: call `unfreeze.update(step=global_step, epoch=epoch)` before each step (and `unfreeze.restore()`
at the end); transformers: `deltatune.integrations.transformers.ProgressiveUnfreezingCallback(unfreeze)`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from deltatune.errors import ConfigError
from deltatune.train.callbacks import Callback

UNITS = ("epoch", "step")


def child_prefixes(model: nn.Module, path: str = "") -> list[str]:
    """Names of the direct children of `model.get_submodule(path)`, in module order (input to output for a
    sequential stack such as GlyphCNN's `blocks`)."""
    parent = model.get_submodule(path) if path else model
    prefix = f"{path}." if path else ""
    return [prefix + name for name, _ in parent.named_children()]


def _belongs(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class ProgressiveUnfreezing(Callback):
    """Unfreeze the trainable parameters of `groups` (name prefixes, input side first) top to bottom.

    Args:
        model: the model being trained; its parameters that require grad now form the trainable set.
        groups: ordered prefixes g_1 (input) ... g_K (output); each must own at least one trainable parameter.
        every: stage length in `unit`s (stage = position // every), or None with `milestones`.
        unit: "epoch" or "step".
        milestones: strictly increasing positions (in `unit`s) where stages 1, 2, ... start; at most K.
    """

    def __init__(self, model: nn.Module, groups: Sequence[str], *, every: int | None = None, unit: str = "epoch",
                 milestones: Sequence[int] | None = None) -> None:
        if unit not in UNITS:
            raise ConfigError(f"unit={unit!r} is invalid: expected one of {UNITS}")
        self._check_schedule(every, milestones, len(groups))
        self.every, self.unit = every, unit
        self.milestones = None if milestones is None else [int(m) for m in milestones]
        self.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.groups = self._cut_groups(list(groups))
        grouped = {name for names in self.groups for name in names}
        self.always = [name for name in self.trainable if name not in grouped]
        self.stage: int | None = None

    @staticmethod
    def _check_schedule(every: int | None, milestones: Sequence[int] | None, count: int) -> None:
        if count == 0:
            raise ConfigError("groups is empty: expected the name prefixes of the layers to unfreeze, input first")
        if (every is None) == (milestones is None):
            raise ConfigError("give exactly one of every= (a stage every k epochs or steps) and milestones= (where "
                              "each stage starts)")
        if every is not None and not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every={every!r} is invalid: expected an integer >= 1")
        if milestones is not None:
            values = list(milestones)
            if not values or len(values) > count or any(b <= a for a, b in zip(values, values[1:])) or values[0] < 1:
                raise ConfigError(f"milestones={values} is invalid: expected 1 to {count} strictly increasing "
                                  "positions >= 1 (stage s starts at milestones[s-1])")

    def _cut_groups(self, prefixes: list[str]) -> list[list[str]]:
        groups = []
        for prefix in prefixes:
            names = [name for name in self.trainable if _belongs(name, prefix)]
            if not names:
                raise ConfigError(f"group {prefix!r} owns no trainable parameter; expected prefixes of trainable "
                                  f"parameter names such as {list(self.trainable)[:3]}")
            taken = [name for name in names if any(name in g for g in groups)]
            if taken:
                raise ConfigError(f"group {prefix!r} overlaps an earlier group ({taken[0]}); groups must be disjoint")
            groups.append(names)
        return groups

    # --- the schedule -------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.groups) + 1

    def stage_at(self, step: int, epoch: int) -> int:
        """The stage in force at this position: 0 (head only) ... K (every group unfrozen)."""
        position = epoch if self.unit == "epoch" else step
        if self.every is not None:
            stage = position // self.every
        else:
            stage = sum(1 for milestone in self.milestones if position >= milestone)
        return min(stage, len(self.groups))

    def trainable_names(self, stage: int) -> list[str]:
        """The parameters trained at `stage`: those in no group, then g_K down to g_(K-stage+1)."""
        open_groups = self.groups[len(self.groups) - stage:] if stage else []
        return self.always + [name for names in open_groups for name in names]

    def apply(self, stage: int) -> None:
        """Set requires_grad for `stage` (only on the parameters that were trainable at the start)."""
        wanted = set(self.trainable_names(stage))
        for name, parameter in self.trainable.items():
            parameter.requires_grad_(name in wanted)
        self.stage = stage

    def update(self, step: int, epoch: int) -> int:
        """Apply the stage of this position if it changed; returns it (call before each step in a plain loop)."""
        stage = self.stage_at(step, epoch)
        if stage != self.stage:
            self.apply(stage)
        return stage

    def restore(self) -> None:
        """Make every originally trainable parameter trainable again (after training)."""
        for parameter in self.trainable.values():
            parameter.requires_grad_(True)
        self.stage = None

    # --- as a Trainer callback ----------------------------------------------------------------------------
    def on_step_begin(self, progress: Any = None, global_step: int = 0, epoch: int = 0, **kwargs: Any) -> None:
        if progress is not None:
            global_step, epoch = progress.global_step, progress.epoch
        self.update(global_step, epoch)

    def on_train_end(self, **kwargs: Any) -> None:
        self.restore()

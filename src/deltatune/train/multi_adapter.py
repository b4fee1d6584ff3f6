"""Training several adapters at once on one frozen base, each sample routed to its own adapter.

    from deltatune.train.multi_adapter import MultiAdapterTraining

    training = MultiAdapterTraining(model, ["fr", "de", "es"], lambda params: torch.optim.AdamW(params, lr=1e-3))
    for batch, names in batches:                    # names[i]: the adapter sample i trains
        def per_sample_losses():                    # run inside `deltatune.route(model, names)`
            logits = model(batch["input_ids"]).logits
            return F.cross_entropy(logits, batch["labels"], reduction="none")   # one loss per sample
        training.step(names, per_sample_losses)
    training.save("out")                            # out/fr, out/de, out/es: one adapter folder each

One forward and one backward serve every adapter in the batch (`deltatune.route`): each adapter's loss is the mean
of its own samples' losses (plus its deltas' regularizers), so its gradients are those of its sub-batch alone, and
its own optimizer steps on them. That makes a run equal, to float tolerance, to training the adapters one by one
on their sub-batches (tests/train/test_multi_adapter.py), as long as the model has no batch-coupled randomness or
statistics in training mode (dropout masks are drawn per call, BatchNorm in train mode mixes rows: use eval-mode
norms or accept the difference). Adapters with `extra_trainable` modules are refused: a head shared by the base
would take gradients from every adapter's rows. This is a plain loop helper; `deltatune.train.Trainer` drives one
optimizer and stays single-adapter.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.core.model import _config_of, iter_deltas, set_training_mode
from deltatune.core.routing import BASE, route
from deltatune.core.state import save_adapter
from deltatune.errors import ConfigError, TrainingError

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class MultiAdapterTraining:
    """Adapters `names` of `model`, trained together: each with its own optimizer (`make_optimizer(params)`)."""

    def __init__(self, model: nn.Module, names: Sequence[str], make_optimizer: OptimizerFactory) -> None:
        self.model = model
        self.names = tuple(dict.fromkeys(names))
        for name in self.names:
            _refuse_shared_modules(model, name)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.optimizers = {name: make_optimizer(self._unfrozen(name)) for name in self.names}
        set_training_mode(model)

    def _unfrozen(self, name: str) -> list[nn.Parameter]:
        parameters = [p for _, _, delta in iter_deltas(self.model, name) for p in delta.parameters()]
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    def step(self, adapter_names: Sequence[str], per_sample_losses: Callable[[], Tensor]) -> dict[str, float]:
        """One optimizer step of every adapter that has samples in this batch; returns each one's loss.

        `per_sample_losses()` runs the model on the batch (inside `deltatune.route(model, adapter_names)`) and
        returns a (batch,) tensor of losses, sample i's from adapter `adapter_names[i]`."""
        unknown = [n for n in adapter_names if n != BASE and n not in self.names]
        if unknown:
            raise ConfigError(f"adapter {unknown[0]!r} is not trained here (adapters: {', '.join(self.names)}); "
                              "add it to MultiAdapterTraining(model, names, ...)")
        with route(self.model, adapter_names):
            losses = per_sample_losses()
        if losses.shape != (len(adapter_names),):
            raise TrainingError(f"per_sample_losses returned shape {tuple(losses.shape)}; expected one loss per "
                                f"sample, ({len(adapter_names)},): use reduction='none' and average within a sample")
        per_adapter = self._adapter_losses(adapter_names, losses)
        total = torch.stack(list(per_adapter.values())).sum()
        if not torch.isfinite(total):
            raise TrainingError(f"the loss is {total.item()} at this step; lower the learning rate")
        total.backward()
        for name in per_adapter:
            self.optimizers[name].step()
            self.optimizers[name].zero_grad()
        return {name: float(loss.detach()) for name, loss in per_adapter.items()}

    def _adapter_losses(self, adapter_names: Sequence[str], losses: Tensor) -> dict[str, Tensor]:
        """adapter -> mean of its samples' losses + its deltas' regularizers, for the adapters in this batch."""
        result = {}
        for name in dict.fromkeys(adapter_names):
            if name == BASE:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=losses.device)
            loss = losses.index_select(0, rows).mean()
            for _, _, delta in iter_deltas(self.model, name):
                term = delta.regularization()
                loss = loss if term is None else loss + term
            result[name] = loss
        return result

    def save(self, folder: str | os.PathLike, format: str = "deltatune") -> dict[str, Path]:
        """Save each adapter into its own folder `folder/<name>`; returns name -> folder."""
        return {name: save_adapter(self.model, Path(folder) / name, name, format=format) for name in self.names}


def _refuse_shared_modules(model: nn.Module, name: str) -> None:
    config = _config_of(model, name)
    if config.extra_trainable:
        raise ConfigError(f"adapter {name!r} trains extra modules {list(config.extra_trainable)}, which every "
                          "routed sample shares; train it alone (deltatune.train.Trainer) or adapt without "
                          "extra_trainable")

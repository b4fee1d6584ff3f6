"""Progressive unfreezing: the trainable set at each step is the schedule's, frozen parameters get no update and
no optimizer state, composition with delta methods, the transformers callback, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.train import ProgressiveUnfreezing, TrainConfig, Trainer
from deltatune.train.unfreezing import child_prefixes

from .trainer_toys import BlobDataset

LAYERS = ["layers.0", "layers.1", "layers.2"]


class Stack(nn.Module):
    """Three hidden Linear layers (`layers.<i>`) and a `head`."""

    def __init__(self, features: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        widths = [features, hidden, hidden, hidden]
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(3))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def stack(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack()


class TrainableSets:
    """Records, at each step's end, which parameters required grad and which ones moved in that step."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.sets, self.moved = model, [], []
        self._before: dict[str, torch.Tensor] = {}

    def on_step_begin(self, **kwargs) -> None:
        self._before = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def on_step_end(self, **kwargs) -> None:
        self.sets.append({n for n, p in self.model.named_parameters() if p.requires_grad})
        self.moved.append({n for n, p in self.model.named_parameters() if not torch.equal(p, self._before[n])})


def names_under(model: nn.Module, *prefixes: str) -> set[str]:
    return {n for n, p in model.named_parameters() if any(n.startswith(prefix + ".") for prefix in prefixes)}


def test_child_prefixes_are_in_module_order() -> None:
    assert child_prefixes(stack(), "layers") == LAYERS
    assert child_prefixes(stack()) == ["layers", "head"]


def test_the_trainable_set_at_each_step_is_the_schedules() -> None:
    model = stack()
    unfreeze = ProgressiveUnfreezing(model, LAYERS, every=2, unit="step")
    record = TrainableSets(model)
    config = TrainConfig(max_steps=8, batch_size=8, lr=1e-2, progress=False, eval_every_epoch=False)
    Trainer(model, config, BlobDataset(16), callbacks=[unfreeze, record]).train()
    head = names_under(model, "head")
    expected = [head, head, head | names_under(model, "layers.2"), head | names_under(model, "layers.2"),
                head | names_under(model, "layers.1", "layers.2"), head | names_under(model, "layers.1", "layers.2"),
                head | names_under(model, "layers.0", "layers.1", "layers.2")] + \
        [head | names_under(model, *LAYERS)]
    assert record.sets == expected
    assert record.moved == expected  # exactly the trainable parameters moved (the others: no update at all)
    assert all(p.requires_grad for p in model.parameters())  # restored at the end of training


def test_epoch_units_and_milestones() -> None:
    by_epoch = ProgressiveUnfreezing(stack(), LAYERS, every=3)
    assert [by_epoch.stage_at(step=0, epoch=e) for e in range(12)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    listed = ProgressiveUnfreezing(stack(), LAYERS, milestones=[1, 5], unit="step")
    assert [listed.stage_at(step=s, epoch=0) for s in range(7)] == [0, 1, 1, 1, 1, 2, 2]
    assert listed.trainable_names(1) == ["head.weight", "head.bias", "layers.2.weight", "layers.2.bias"]


def test_frozen_parameters_get_no_update_and_no_optimizer_state() -> None:
    model = stack()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    unfreeze = ProgressiveUnfreezing(model, LAYERS, every=2, unit="step")
    config = TrainConfig(max_steps=3, batch_size=8, lr=1e-2, weight_decay=0.1, progress=False,
                         eval_every_epoch=False)
    trainer = Trainer(model, config, BlobDataset(16), callbacks=[unfreeze])
    trainer.train()
    frozen = names_under(model, "layers.0", "layers.1")  # never reached by stage 1
    by_name = dict(model.named_parameters())
    state = trainer.optimizer.state
    for name in frozen:
        assert torch.equal(by_name[name], start[name]), name  # not even weight decay touched them
        assert by_name[name] not in state or not state[by_name[name]], name
    for name in names_under(model, "layers.2", "head"):
        assert not torch.equal(by_name[name], start[name]), name
        assert by_name[name] in state
    steps = {name: int(state[by_name[name]]["step"]) for name in names_under(model, "layers.2", "head")}
    assert steps == {name: 1 if name.startswith("layers.2") else 3 for name in steps}  # thawed at step 2


@pytest.mark.parametrize("method", ["lora", "ssf"])
def test_adapters_of_layers_nearer_the_input_join_later(method: str) -> None:
    model = stack()
    options = {"rank": 2} if method == "lora" else {}
    dt.adapt(model, dt.config_for(method, targets=LAYERS, extra_trainable=["head"], **options))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unfreeze = ProgressiveUnfreezing(model, LAYERS, every=1, unit="step")
    record = TrainableSets(model)
    config = TrainConfig(max_steps=4, batch_size=8, lr=1e-2, progress=False, eval_every_epoch=False)
    Trainer(model, config, BlobDataset(16), callbacks=[unfreeze, record]).train()
    deltas = {i: {n for n in trainable if n.startswith(f"layers.{i}.deltas.")} for i in range(3)}
    head = {"head.weight", "head.bias"}
    assert all(deltas.values())
    assert record.sets == [head, head | deltas[2], head | deltas[2] | deltas[1], trainable]
    moved_not_allowed = [m - s for m, s in zip(record.moved, record.sets)]
    assert all(not extra for extra in moved_not_allowed)  # nothing outside the schedule moved, base weights never
    assert all(not any(".base_layer." in n for n in m) for m in record.moved)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_the_transformers_callback_applies_the_schedule(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from deltatune.integrations.transformers import ProgressiveUnfreezingCallback

    class HFStack(Stack):
        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
            logits = super().forward(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    model = HFStack()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    unfreeze = ProgressiveUnfreezing(model, LAYERS, every=2, unit="step")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=list(BlobDataset(16)),
                         callbacks=[ProgressiveUnfreezingCallback(unfreeze)]).train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == names_under(model, "head", "layers.2")
    assert all(p.requires_grad for p in model.parameters())


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one of every= .* and milestones="):
        ProgressiveUnfreezing(stack(), LAYERS)
    with pytest.raises(ConfigError, match="exactly one of"):
        ProgressiveUnfreezing(stack(), LAYERS, every=1, milestones=[1])
    with pytest.raises(ConfigError, match="strictly increasing"):
        ProgressiveUnfreezing(stack(), LAYERS, milestones=[3, 2])
    with pytest.raises(ConfigError, match="unit='batch' is invalid"):
        ProgressiveUnfreezing(stack(), LAYERS, every=1, unit="batch")
    with pytest.raises(ConfigError, match="group 'layers.7' owns no trainable parameter"):
        ProgressiveUnfreezing(stack(), ["layers.7"], every=1)
    with pytest.raises(ConfigError, match="overlaps an earlier group"):
        ProgressiveUnfreezing(stack(), ["layers", "layers.1"], every=1)
    with pytest.raises(ConfigError, match="groups is empty"):
        ProgressiveUnfreezing(stack(), [], every=1)

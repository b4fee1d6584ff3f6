"""Every update rule in deltatune's Trainer (by name), on several delta methods, with checkpoints; in a
transformers Trainer (LoRA-Pro as its optimizer, SAM through `SharpnessAwareStep`); refused settings."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.optim import SAM, build_update_rule
from deltatune.train import TrainConfig, Trainer
from optim.toy_task import HFToy, Toy, toy_data

pytestmark = pytest.mark.usefixtures("one_thread")




def _adapted(method: str) -> nn.Module:
    torch.manual_seed(0)
    return dt.adapt(Toy(), dt.config_for(method, rank=2, targets=["first"], extra_trainable=("second",)))


def _config(**changes) -> TrainConfig:
    settings = dict(epochs=4, batch_size=16, lr=2e-2, progress=False, log_every=1, schedule="constant",
                    max_grad_norm=None)
    return TrainConfig(**{**settings, **changes})


RULES = [("adamw", {}), ("loraplus", {"ratio": 4.0}), ("lora_pro", {}), ("lora_pro_light", {}),
         ("sam", {"rho": 0.05}), ("sam", {"rho": 0.05, "base": "loraplus"})]


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("rule, options", RULES)
def test_every_rule_trains_lora_and_dora(method: str, rule: str, options: dict) -> None:
    result = Trainer(_adapted(method), _config(update_rule=rule, update_rule_options=options), toy_data()).train()
    losses = [record["loss"] for record in result.history if "loss" in record]
    assert losses[-1] < losses[0]


def test_sam_works_on_any_method() -> None:
    trainer = Trainer(_adapted("loha"), _config(update_rule="sam"), toy_data())
    assert isinstance(trainer.optimizer, SAM)
    losses = [r["loss"] for r in trainer.train().history if "loss" in r]
    assert losses[-1] < losses[0]


def test_trainers_sam_is_a_plain_loops_sam() -> None:
    """The Trainer's closure recomputes the same batch at w + ε̂: its run equals a hand-written SAM loop."""
    model = _adapted("lora")
    manual = copy.deepcopy(model)
    Trainer(model, _config(update_rule="sam", update_rule_options={"rho": 0.1}, epochs=1), toy_data()).train()
    optimizer = build_update_rule("sam", manual, lr=2e-2, rho=0.1)
    data = toy_data()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()  # the Trainer's epoch 0
    for start in range(0, len(order), 16):
        x, y = data[order[start:start + 16]]

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            loss = torch.nn.functional.cross_entropy(manual(x), y)
            loss.backward()
            return loss

        optimizer.zero_grad()
        closure()
        optimizer.step(closure)
    for (name, mine), theirs in zip(model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(mine, theirs, msg=name)


@pytest.mark.parametrize("rule", ["lora_pro", "sam"])
def test_resume_continues_exactly(rule: str, tmp_path) -> None:
    straight = Trainer(_adapted("lora"), _config(update_rule=rule, max_steps=6), toy_data())
    straight.train()
    first = Trainer(_adapted("lora"), _config(update_rule=rule, max_steps=3, output_dir=str(tmp_path)), toy_data())
    first.train()
    second = Trainer(_adapted("lora"), _config(update_rule=rule, max_steps=6, output_dir=str(tmp_path), resume=True),
                     toy_data())
    second.train()
    for mine, theirs in zip(second.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(mine, theirs)


def test_refused_settings_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="update_rule"):
        _config(update_rule="adafactor")
    with pytest.raises(ConfigError, match=r"no option\(s\) \['radius'\]"):
        Trainer(_adapted("lora"), _config(update_rule="sam", update_rule_options={"radius": 0.1}), toy_data())
    with pytest.raises(ConfigError, match="rho"):
        Trainer(_adapted("lora"), _config(update_rule="sam", update_rule_options={"rho": 0.0}), toy_data())
    with pytest.raises(ConfigError, match="ratio"):
        Trainer(_adapted("lora"), _config(update_rule="loraplus", update_rule_options={"ratio": -1}), toy_data())
    with pytest.raises(ConfigError, match=r"LoRA-Pro needs a model with trainable low-rank \(A, B\) pairs"):
        Trainer(_adapted("loha"), _config(update_rule="lora_pro"), toy_data())
    with pytest.raises(ConfigError, match="optimizer_factory"):
        Trainer(_adapted("lora"), _config(update_rule="sam"), toy_data(), optimizer_factory=torch.optim.SGD)


# --- transformers -------------------------------------------------------------------------------------------
def _hf_run(tmp_path, rule: str, trainer_cls=None, **options):
    transformers = pytest.importorskip("transformers")
    from deltatune.integrations.transformers import update_rule_optimizers

    torch.manual_seed(0)
    model = dt.adapt(HFToy(), dt.LoRAConfig(rank=2, targets=["first"], extra_trainable=("second",)))
    data = [{"x": x, "labels": y} for x, y in toy_data(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=2e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = (trainer_cls or transformers.Trainer)(model=model, args=args, train_dataset=data,
                                                    optimizers=update_rule_optimizers(model, args, rule, **options))
    return trainer, trainer.train()


def test_lora_pro_as_a_transformers_trainer_optimizer(tmp_path) -> None:
    trainer, output = _hf_run(tmp_path, "lora_pro")
    delta = next(d for _, _, d in dt.iter_deltas(trainer.model))
    assert output.global_step == 4 and bool(delta.lora_B.abs().sum() > 0)


def test_sam_in_a_transformers_trainer_runs_two_passes(tmp_path) -> None:
    import transformers

    from deltatune.integrations.transformers import SharpnessAwareStep

    calls = []

    class Counting(SharpnessAwareStep, transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append(1)
            return super().compute_loss(model, inputs, *args, **kwargs)

    _, output = _hf_run(tmp_path, "sam", Counting, rho=0.05)
    assert output.global_step == 4 and len(calls) == 8


def test_command_line_update_rule(tmp_path, capsys) -> None:
    from deltatune.cli import main

    argv = ["train", "--task", "digits", "--method", "lora", "-p", "targets=conv2", "--max-steps", "2", "--out",
            str(tmp_path / "run"),
            "--update-rule", "sam", "--rule-option", "rho=0.1", "--rule-option", "base=loraplus"]
    assert main(argv) == 0
    assert main(["train", "--task", "digits", "-p", "targets=conv2", "--update-rule", "sam", "--rule-option",
                 "radius=0.1", "--max-steps", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "radius" in capsys.readouterr().err

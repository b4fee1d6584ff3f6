"""LoRA-MGPO: ε = −ρ·v/‖v‖·min(10, 1/ḡ) from AdamW's first moments against a float64 hand computation, the ḡ
EMA, the sign, the base weight restored bit-exactly, every layer kind and pair-holding method, the Trainer and
transformers paths, refusals."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.errors import ConfigError, TrainingError
from deltatune.optim import MGPO, build_update_rule
from deltatune.train import TrainConfig, Trainer
from optim.toy_task import HFToy, Toy, toy_data

pytestmark = pytest.mark.usefixtures("one_thread")




def _adapted(method: str = "lora", dtype: torch.dtype = torch.float32, **options) -> nn.Module:
    torch.manual_seed(0)
    config = dt.config_for(method, rank=2, targets=["first"], extra_trainable=("second",), **options)
    return dt.adapt(Toy().to(dtype), config)


def _seen_base(model: nn.Module, path: str = "first") -> list[Tensor]:
    """A list that receives a copy of `path`'s base weight at every forward of that layer."""
    seen: list[Tensor] = []
    host = model.get_submodule(path)
    host.register_forward_pre_hook(lambda module, args: seen.append(module.base_layer.weight.detach().clone()))
    return seen


def _effective_norm(a: Tensor, b: Tensor, g_a: Tensor, g_b: Tensor, s: float) -> Tensor:
    return torch.linalg.vector_norm(s * (g_b @ a + b @ g_a))


def test_perturbation_and_ema_are_the_codes_equations_in_float64() -> None:
    """Step 1: no optimizer state, no ε; ḡ₁ = ‖s(g_B·A + B·g_A)‖. Step 2: ε = −ρ·v/‖v‖·min(10, 1/ḡ₁) with
    v = s(M_B·A + B·M_A), M = (1 − μ)·g₁ (AdamW's exp_avg after one step), the gradient taken at W0 + ε, and
    ḡ₂ = β·ḡ₁ + (1 − β)·‖…‖ of that gradient. All computed here by hand in float64."""
    rho, mu, beta, lr = 0.2, 0.7, 0.6, 0.05
    model = _adapted(dtype=torch.float64, init="random")
    host = model.get_submodule("first")
    delta = host.deltas["default"]
    s = float(delta.scale)
    w0 = host.base_layer.weight.detach().clone()
    seen = _seen_base(model)
    optimizer = MGPO(model, lr=lr, rho=rho, mu=mu, beta=beta)
    x, y = toy_data(16)[:]
    x = x.double()

    def gradient_pass() -> None:
        with optimizer.perturbed():
            nn.functional.cross_entropy(model(x), y).backward()

    gradient_pass()
    torch.testing.assert_close(seen[0], w0, rtol=0, atol=0)  # the first step is not perturbed
    a1, b1 = delta.lora_A.detach().clone(), delta.lora_B.detach().clone()
    g1_a, g1_b = delta.lora_A.grad.clone(), delta.lora_B.grad.clone()
    ema1 = _effective_norm(a1, b1, g1_a, g1_b, s)
    torch.testing.assert_close(optimizer.grad_ema["first.default"].double(), ema1)
    optimizer.step()
    optimizer.zero_grad()

    a2, b2 = delta.lora_A.detach().clone(), delta.lora_B.detach().clone()
    v = s * (((1 - mu) * g1_b) @ a2 + b2 @ ((1 - mu) * g1_a))
    epsilon = -rho * v / torch.linalg.vector_norm(v) * min(10.0, 1.0 / float(ema1))
    gradient_pass()
    torch.testing.assert_close(seen[1] - w0, epsilon, rtol=1e-10, atol=1e-12)
    assert float((seen[1] - w0).flatten() @ v.flatten()) < 0  # along the NEGATIVE momentum direction
    torch.testing.assert_close(host.base_layer.weight.detach(), w0, rtol=0, atol=0)

    # the gradient is the one at W0 + ε: the same model with that base weight, unperturbed
    reference = copy.deepcopy(model)
    reference.zero_grad()
    with torch.no_grad():
        reference.get_submodule("first").base_layer.weight.add_(epsilon)
    nn.functional.cross_entropy(reference(x), y).backward()
    reference_delta = reference.get_submodule("first").deltas["default"]
    torch.testing.assert_close(delta.lora_A.grad, reference_delta.lora_A.grad)
    torch.testing.assert_close(delta.lora_B.grad, reference_delta.lora_B.grad)
    ema2 = beta * ema1 + (1 - beta) * _effective_norm(a2, b2, delta.lora_A.grad, delta.lora_B.grad, s)
    torch.testing.assert_close(optimizer.grad_ema["first.default"].double(), ema2)
    assert optimizer.param_groups[0]["betas"] == (mu, 0.999)  # AdamW with β1 = μ


@pytest.mark.parametrize("loss_scale, expected", [(1e-4, lambda ema: 10.0), (1e3, lambda ema: 1.0 / ema)])
def test_the_radius_is_rho_times_min_of_ten_and_one_over_ema(loss_scale: float, expected) -> None:
    """‖ε‖_F = ρ·min(10, 1/ḡ): tiny gradients hit the clamp at 10, large ones shrink ε."""
    model = _adapted(dtype=torch.float64, init="random")
    seen = _seen_base(model)
    w0 = model.get_submodule("first").base_layer.weight.detach().clone()
    optimizer = MGPO(model, lr=1e-3, rho=0.05)
    x, y = toy_data(16)[:]
    for _ in range(2):
        with optimizer.perturbed():
            (loss_scale * nn.functional.cross_entropy(model(x.double()), y)).backward()
        if len(seen) == 1:
            ema = float(optimizer.grad_ema["first.default"])
        optimizer.step()
        optimizer.zero_grad()
    radius = float(torch.linalg.vector_norm(seen[1] - w0))
    assert radius == pytest.approx(0.05 * expected(ema), rel=1e-6)  # ‖v‖ + 1e-12 in the denominator, as the code


def test_base_weight_is_bit_identical_after_every_step_and_after_an_error() -> None:
    model = _adapted(init="random")
    with torch.no_grad():  # values of very different magnitudes: W0 + ε − ε would not round-trip
        model.first.base_layer.weight.mul_(torch.logspace(-6, 6, 48).reshape(8, 6))
    w0 = model.first.base_layer.weight.detach().clone()
    optimizer = MGPO(model, lr=1e-2, rho=0.5)
    x, y = toy_data(16)[:]
    moved = []
    for _ in range(6):
        with optimizer.perturbed():
            moved.append(not torch.equal(model.first.base_layer.weight, w0))
            nn.functional.cross_entropy(model(x), y).backward()
        assert torch.equal(model.first.base_layer.weight, w0)
        optimizer.step()
        optimizer.zero_grad()
    assert moved == [False] + [True] * 5
    ema = dict(optimizer.grad_ema)
    with pytest.raises(RuntimeError, match="boom"), optimizer.perturbed():
        assert not torch.equal(model.first.base_layer.weight, w0)
        raise RuntimeError("boom")
    assert torch.equal(model.first.base_layer.weight, w0) and optimizer.grad_ema == ema


class Kinds(nn.Module):
    """An embedding, a transformers-free Conv2d and a Linear, each adapted with LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 4)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.proj = nn.Linear(5, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens).permute(0, 2, 1).reshape(tokens.shape[0], 4, 3, 3)
        return self.proj(torch.relu(self.conv(h)).mean((2, 3)))


def test_epsilon_lands_in_each_layer_kinds_native_weight() -> None:
    torch.manual_seed(0)
    model = dt.adapt(Kinds().double(), dt.LoRAConfig(rank=2, targets=["embed", "conv", "proj"], init="random"))
    optimizer = MGPO(model, lr=1e-2)
    tokens, target = torch.randint(0, 12, (8, 9)), torch.randint(0, 3, (8,))
    for step in range(2):
        hosts = {p.name: p for p in optimizer.pairs}
        before = {name: p.host.base_layer.weight.detach().clone() for name, p in hosts.items()}
        expected = {name: optimizer.perturbation(p) for name, p in hosts.items()}
        with optimizer.perturbed():
            for name, pair in hosts.items():
                moved = pair.host.layer.to_matrix(pair.host.base_layer.weight.detach() - before[name])
                if expected[name] is None:
                    assert step == 0 and torch.equal(moved, torch.zeros_like(moved))
                else:
                    torch.testing.assert_close(moved, expected[name])
            nn.functional.cross_entropy(model(tokens), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sorted(hosts) == ["conv.default", "embed.default", "proj.default"]


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "olora"])
def test_composes_with_every_pair_method_in_the_trainer(method: str) -> None:
    model = _adapted(method)
    base = model.first.base_layer.weight.detach().clone()  # PiSSA / OLoRA: the residual the adapter left
    config = TrainConfig(epochs=4, batch_size=16, lr=2e-2, progress=False, log_every=1, schedule="constant",
                         max_grad_norm=None, update_rule="mgpo", update_rule_options={"rho": 0.05})
    trainer = Trainer(model, config, toy_data())
    assert isinstance(trainer.optimizer, MGPO)
    losses = [r["loss"] for r in trainer.train().history if "loss" in r]
    assert losses[-1] < losses[0]
    assert torch.equal(model.first.base_layer.weight, base)
    assert set(trainer.optimizer.grad_ema) == {"first.default"}


def test_trainers_mgpo_is_a_plain_loops_mgpo_and_resumes_exactly(tmp_path) -> None:
    settings = dict(batch_size=16, lr=2e-2, progress=False, log_every=1, schedule="constant", max_grad_norm=None,
                    update_rule="mgpo")
    model = _adapted(init="random")
    manual = copy.deepcopy(model)
    Trainer(model, TrainConfig(epochs=1, **settings), toy_data()).train()
    optimizer = build_update_rule("mgpo", manual, lr=2e-2)
    data = toy_data()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()  # the Trainer's epoch 0
    for start in range(0, len(order), 16):
        x, y = data[order[start:start + 16]]
        optimizer.zero_grad()
        with optimizer.perturbed():
            nn.functional.cross_entropy(manual(x), y).backward()
        optimizer.step()
    for (name, mine), theirs in zip(model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(mine, theirs, msg=name)

    straight = Trainer(_adapted(init="random"), TrainConfig(max_steps=6, **settings), toy_data())
    straight.train()
    Trainer(_adapted(init="random"), TrainConfig(max_steps=3, output_dir=str(tmp_path), **settings), toy_data()).train()
    second = Trainer(_adapted(init="random"), TrainConfig(max_steps=6, output_dir=str(tmp_path), resume=True,
                                                          **settings), toy_data())
    second.train()
    for mine, theirs in zip(second.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(second.optimizer.grad_ema, straight.optimizer.grad_ema)


def test_a_step_with_a_closure_runs_the_pass_perturbed() -> None:
    model = _adapted(init="random")
    optimizer = MGPO(model, lr=1e-2)
    x, y = toy_data(16)[:]

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        assert isinstance(optimizer.step(closure), Tensor)
    assert "first.default" in optimizer.grad_ema


def test_profiles_and_refusals_name_the_problem() -> None:
    model = _adapted()
    nlg = MGPO(model, lr=1e-3, profile="nlg")
    assert (nlg.rho, nlg.mu, nlg.beta) == (0.01, 0.8, 0.8)
    assert (MGPO(model, lr=1e-3, rho=0.1).rho, MGPO(model, lr=1e-3).mu) == (0.1, 0.9)
    for bad in ({"rho": 0.0}, {"rho": -1}, {"mu": 1.0}, {"beta": -0.1}, {"profile": "vision"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            MGPO(model, lr=1e-3, **bad)
    with pytest.raises(ConfigError, match=r"MGPO needs a model with trainable low-rank \(A, B\) pairs"):
        MGPO(dt.adapt(Toy(), dt.config_for("loha", rank=2, targets=["first"])), lr=1e-3)
    with pytest.raises(ConfigError, match="cannot wrap 'mgpo'"):
        build_update_rule("sam", model, lr=1e-3, base="mgpo")
    with pytest.raises(ConfigError, match=r"no option\(s\) \['betas'\]"):
        build_update_rule("mgpo", model, lr=1e-3, betas=(0.9, 0.99))
    quantized = _adapted()
    quantized.first.base_layer.weight = nn.Parameter(torch.zeros(8, 6, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ConfigError, match="no floating-point weight"):
        MGPO(quantized, lr=1e-3)

    optimizer = MGPO(model, lr=1e-3)
    nn.functional.cross_entropy(model(toy_data(8)[:][0]), toy_data(8)[:][1]).backward()
    with pytest.raises(TrainingError, match=r"inside optimizer.perturbed\(\)"):
        optimizer.step()
    optimizer.perturb()
    with pytest.raises(TrainingError, match="twice"):
        optimizer.perturb()
    optimizer.restore()
    with pytest.raises(TrainingError, match="mgpo_grad_ema"):
        optimizer.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_other_trainable_methods_beside_the_pairs_get_plain_adamw() -> None:
    torch.manual_seed(0)
    model = dt.adapt(Toy(), dt.config_for("lora", rank=2, targets=["first"]))
    dt.adapt(model, dt.config_for("loha", rank=2, targets=["second"]), name="other")
    dt.set_active(model, ["default", "other"])
    for _, _, delta in dt.iter_deltas(model):  # both adapters train (adapt leaves only the newest trainable)
        delta.requires_grad_(True)
    optimizer = MGPO(model, lr=1e-2)
    assert [p.name for p in optimizer.pairs] == ["first.default"]
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


# --- transformers ---------------------------------------------------------------------------------------------
def _hf_trainer(tmp_path, mixin: bool):
    transformers = pytest.importorskip("transformers")
    from deltatune.integrations.transformers import MomentumPerturbedStep, update_rule_optimizers

    torch.manual_seed(0)
    model = dt.adapt(HFToy(), dt.LoRAConfig(rank=2, targets=["first"], extra_trainable=("second",), init="random"))
    data = [{"x": x, "labels": y} for x, y in toy_data(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=2e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant")
    cls = type("MGPOTrainer", (MomentumPerturbedStep, transformers.Trainer), {}) if mixin else transformers.Trainer
    return cls(model=model, args=args, train_dataset=data, optimizers=update_rule_optimizers(model, args, "mgpo"))


def test_mgpo_in_a_transformers_trainer(tmp_path) -> None:
    trainer = _hf_trainer(tmp_path, mixin=True)
    base = trainer.model.first.base_layer.weight.detach().clone()
    seen = _seen_base(trainer.model)
    output = trainer.train()
    assert output.global_step == 4 and len(seen) == 4
    assert torch.equal(seen[0], base) and all(not torch.equal(w, base) for w in seen[1:])  # perturbed from step 2
    assert torch.equal(trainer.model.first.base_layer.weight, base)
    mgpo = trainer.optimizer.optimizer if not isinstance(trainer.optimizer, MGPO) else trainer.optimizer
    assert isinstance(mgpo, MGPO) and set(mgpo.grad_ema) == {"first.default"}


def test_a_transformers_trainer_without_the_mixin_is_refused(tmp_path) -> None:
    with pytest.raises(TrainingError, match="MomentumPerturbedStep"):
        _hf_trainer(tmp_path, mixin=False).train()


def test_command_line_mgpo(tmp_path) -> None:
    from deltatune.cli import main

    argv = ["train", "--task", "digits", "--method", "lora", "-p", "targets=conv2", "--max-steps", "2", "--out",
            str(tmp_path / "run"), "--update-rule", "mgpo", "--rule-option", "rho=0.1"]
    assert main(argv) == 0

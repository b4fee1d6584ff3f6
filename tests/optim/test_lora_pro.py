"""LoRA-Pro: the closed form and the Sylvester solve against float64 brute force, the optimizer's step against the
paper's Adam version built by hand, the real scale, and the claim on a real batch (MiniLM, WordNet glosses)."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.optim import LoRAPro, adjusted_gradients, equivalent_gradient, solve_sylvester

pytestmark = pytest.mark.usefixtures("one_thread")


def _random(*shape: int, generator: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _equivalent_map(down: Tensor, up: Tensor, scale: float) -> Tensor:
    """The matrix J of (H_A, H_B) -> vec(s(B·H_A + H_B·A)), column by column (brute force)."""
    rank, cols = down.shape
    rows = up.shape[0]
    columns = []
    for k in range(rank * cols):
        unit = torch.zeros(rank * cols, dtype=torch.float64)
        unit[k] = 1
        columns.append((scale * up @ unit.view(rank, cols)).reshape(-1))
    for k in range(rows * rank):
        unit = torch.zeros(rows * rank, dtype=torch.float64)
        unit[k] = 1
        columns.append((scale * unit.view(rows, rank) @ down).reshape(-1))
    return torch.stack(columns, 1)


def brute_force(down: Tensor, up: Tensor, full: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """argmin ‖H − g‖ over the least-squares minimisers of ‖J·H − vec(G)‖: H = g + J⁺(G − J·g), by pinv."""
    jacobian = _equivalent_map(down, up, scale)
    raw = torch.cat([(scale * up.T @ full).reshape(-1), (scale * full @ down.T).reshape(-1)])
    best = raw + torch.linalg.pinv(jacobian) @ (full.reshape(-1) - jacobian @ raw)
    split = down.numel()
    return best[:split].view(down.shape), best[split:].view(up.shape)


@pytest.mark.parametrize("rows, cols, rank, scale", [(7, 5, 2, 3.0), (6, 9, 3, 0.5), (10, 4, 1, 2.0)])
def test_closed_form_and_sylvester_match_brute_force(rows: int, cols: int, rank: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(rows * cols + rank)
    down, up, full = _random(rank, cols, generator=generator), _random(rows, rank, generator=generator), \
        _random(rows, cols, generator=generator)
    expected = brute_force(down, up, full, scale)
    got = adjusted_gradients(down, up, scale * up.T @ full, scale * full @ down.T, scale, ridge=0.0)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)
    # X = 0 reaches the same equivalent gradient (the projection of G), but is not the closest to (g_A, g_B)
    zero_x = adjusted_gradients(down, up, scale * up.T @ full, scale * full @ down.T, scale, optimal_x=False, ridge=0.0)
    torch.testing.assert_close(equivalent_gradient(down, up, *zero_x, scale),
                               equivalent_gradient(down, up, *expected, scale), rtol=1e-9, atol=1e-10)
    raw = (scale * up.T @ full, scale * full @ down.T)
    distance = [sum(float((h - g).pow(2).sum()) for h, g in zip(pair, raw)) for pair in (got, zero_x)]
    assert distance[0] < distance[1]


def test_sylvester_solve_against_the_kronecker_system() -> None:
    generator = torch.Generator().manual_seed(5)
    for rank in (1, 3, 6):
        left, right = _random(rank, rank, generator=generator), _random(rank, rank, generator=generator)
        left, right = left @ left.T, right @ right.T + 0.1 * torch.eye(rank, dtype=torch.float64)
        rhs = _random(rank, rank, generator=generator)
        # vec(L X + X R) = (I ⊗ L + Rᵀ ⊗ I) vec(X), column-major vec
        eye = torch.eye(rank, dtype=torch.float64)
        system = torch.kron(eye, left) + torch.kron(right.T.contiguous(), eye)
        expected = torch.linalg.lstsq(system, rhs.T.reshape(-1, 1)).solution.reshape(rank, rank).T
        torch.testing.assert_close(solve_sylvester(left, right, rhs), expected, rtol=1e-9, atol=1e-10)


def test_sylvester_with_a_zero_gram_is_the_least_norm_solution() -> None:
    """B = 0 (LoRA's first step): 0·X + X·AAᵀ = C has the one solution C·(AAᵀ)⁻¹."""
    generator = torch.Generator().manual_seed(2)
    down = _random(3, 8, generator=generator)
    rhs = _random(3, 3, generator=generator)
    gram = down @ down.T
    torch.testing.assert_close(solve_sylvester(torch.zeros(3, 3, dtype=torch.float64), gram, rhs),
                               rhs @ torch.linalg.inv(gram), rtol=1e-9, atol=1e-10)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(9, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _adapted(alpha: float, rank: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = dt.adapt(Layer().double(), dt.LoRAConfig(rank=rank, alpha=alpha, init="random", targets=["proj"]))
    return model


@pytest.mark.parametrize("alpha", [2.0, 16.0])
def test_one_step_is_the_papers_adam_version_with_the_real_scale(alpha: float) -> None:
    """First step, by hand: G̃ = projection of G; U = m̂/(√v̂+ε) = G̃/(|G̃|+ε); (H_A, H_B) = the brute-force
    adjustment of U with the delta's own s = alpha / r (the official code would use 16/8 = 2)."""
    model = _adapted(alpha)
    delta = next(d for _, _, d in dt.iter_deltas(model))
    down, up, scale = delta.lowrank_pair()
    assert scale == alpha / 2
    x = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    full = 2 * (model(x).detach()).T @ x  # ∂L/∂W of L = ‖Wx + b‖² (a linear layer: G = Σ 2y xᵀ)
    before_a, before_b = down.detach().clone(), up.detach().clone()
    projected = equivalent_gradient(before_a, before_b, *brute_force(before_a, before_b, full, scale), scale)
    update = projected / (projected.abs() + 1e-8)
    h_a, h_b = brute_force(before_a, before_b, update, scale)
    optimizer = LoRAPro(model, lr=1e-3)
    optimizer.step()
    torch.testing.assert_close(down.detach(), before_a - 1e-3 * h_a, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(up.detach(), before_b - 1e-3 * h_b, rtol=1e-6, atol=1e-9)
    assert optimizer.state[down]["exp_avg"].shape == (6, 9)  # the full-size moments (out × in)


def test_memory_light_variant_keeps_factor_sized_moments() -> None:
    model = _adapted(4.0)
    down, up, _ = next(d for _, _, d in dt.iter_deltas(model)).lowrank_pair()
    model(torch.randn(4, 9, dtype=torch.float64)).sum().backward()
    optimizer = LoRAPro(model, lr=1e-3, moments="low_rank")
    optimizer.step()
    assert optimizer.state[down]["exp_avg"].shape == down.shape
    assert optimizer.state[up]["exp_avg"].shape == up.shape


def test_refuses_bad_settings_and_models_without_pairs() -> None:
    with pytest.raises(ConfigError, match="moments"):
        LoRAPro(_adapted(4.0), moments="diagonal")
    with pytest.raises(ConfigError, match="lr"):
        LoRAPro(_adapted(4.0), lr=0)
    with pytest.raises(ConfigError, match=r"low-rank \(A, B\) pairs.*adapt it"):
        LoRAPro(dt.adapt(Layer(), dt.config_for("bitfit", targets=["proj"])))


# --- the claim on a real batch ------------------------------------------------------------------------------
def _wordnet_model(method: str):
    from deltatune.data import load_task

    task = load_task("wordnet-nouns", max_length=16)
    batch = task.collate([task.train[i] for i in range(16)])
    torch.manual_seed(0)
    model = dt.adapt(task.build_model(), dt.config_for(method, rank=4, alpha=8.0, targets=["query", "value"],
                                                       extra_trainable=tuple(task.extra_trainable)))
    return model, batch


def _full_gradients(model: nn.Module) -> dict[str, Tensor]:
    """G = ∂L/∂W of every adapted layer's base weight (made to require grad for this)."""
    return {path: host.base_layer.weight.grad for path, host in dt.core.model.iter_hosts(model)}


def test_adjusted_step_is_closer_to_the_full_gradient_on_minilm() -> None:
    """At every step of a LoRA-Pro run on 16 real WordNet glosses: ‖s(B·H_A + H_B·A) − G‖ ≤ ‖s(B·g_A + g_B·A) − G‖
    for every adapted layer (G the full-weight gradient, g the raw LoRA gradients, H their adjustment)."""
    model, batch = _wordnet_model("lora")
    labels = batch.pop("labels")
    for _, host in dt.core.model.iter_hosts(model):
        host.base_layer.weight.requires_grad_(True)
    optimizer = LoRAPro(model, lr=2e-3)
    hosts = list(dt.core.model.iter_hosts(model))
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(**batch), labels).backward()
        for path, host in hosts:
            down, up, scale = host.deltas["default"].lowrank_pair()
            full = host.base_layer.weight.grad
            adjusted = adjusted_gradients(down.detach(), up.detach(), down.grad, up.grad, scale)
            ours = (equivalent_gradient(down.detach(), up.detach(), *adjusted, scale) - full).norm()
            raw = (equivalent_gradient(down.detach(), up.detach(), down.grad, up.grad, scale) - full).norm()
            assert ours <= raw * (1 + 1e-5), (path, float(ours), float(raw))
        host_weights = [h.base_layer.weight for _, h in hosts]
        for weight in host_weights:
            weight.grad = None  # the base stays frozen: LoRA-Pro must not see it
        optimizer.step()
    assert any(bool(h.deltas["default"].lora_B.abs().sum() > 0) for _, h in hosts)


class Mixed(nn.Module):
    """An embedding, a convolution and a linear layer: the factors' matrix views differ in each."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.proj = nn.Linear(6, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        return self.proj(torch.tanh(hidden)).mean(1)


@pytest.mark.parametrize("moments", ["full", "low_rank"])
@pytest.mark.parametrize("method", ["lora", "pissa", "dora"])
def test_steps_on_embedding_conv_and_linear_factors(method: str, moments: str) -> None:
    torch.manual_seed(0)
    targets = ["conv", "proj"] if method == "pissa" else ["embed", "conv", "proj"]  # PiSSA: no embeddings
    model = dt.adapt(Mixed(), dt.config_for(method, rank=2, targets=targets))
    optimizer = LoRAPro(model, lr=1e-2, moments=moments)
    tokens, target = torch.randint(0, 12, (8, 5)), torch.randint(0, 4, (8,))
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(tokens), target)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] and all(torch.isfinite(p).all() for p in model.parameters())

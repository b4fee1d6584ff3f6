"""PCB-Merging against a literal float64 transcription of the official steps, and its coefficient search."""
from __future__ import annotations

import pytest
import torch

from deltatune.merging import merge_state_dicts
from deltatune.merging.methods.pcb import PCBModelParams, PCBParams, pcb_merge
from deltatune.merging.search.coefficients import apply_coefficients, pcb_component_state_dict, search_coefficients


def _normalize(x):
    low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - low) / (high - low)


def _clamp(x, min_ratio, max_ratio):
    d = x.shape[1]
    ordered = torch.sort(x, dim=1).values
    low, high = ordered[:, int(d * min_ratio)], ordered[:, int(d * (1 - max_ratio) - 1)]
    return torch.clamp(x, low.unsqueeze(1), high.unsqueeze(1))


def reference_pcb(tasks, ratio, eps, lambdas, pairwise=False):
    """The official pcb-merging.py steps (and pcb_ES.py's inter-balancing when `pairwise`), written out."""
    n = tasks.shape[0]
    magnitude = _clamp(tasks.abs(), eps, eps)
    clamped = tasks.sign() * magnitude
    intra = torch.exp(n * _normalize(magnitude) ** 2)
    if pairwise:
        signed = tasks.sign() * _normalize(magnitude)
        inter = torch.stack([torch.tanh(signed[i] * signed).sum(0) for i in range(n)])
    else:
        inter = torch.tanh(tasks * tasks.sum(0))
    scale = _normalize(_clamp(intra * inter, 1 - ratio, 0))
    weighted = clamped * torch.tensor(lambdas, dtype=tasks.dtype).unsqueeze(1)
    return (weighted * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12), scale


@pytest.mark.parametrize("pairwise", [False, True])
@pytest.mark.parametrize("ratio,eps", [(0.1, 1e-4), (0.2, 0.01), (1.0, 0.0)])
def test_pcb_matches_the_official_steps(pairwise, ratio, eps):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(400, generator=generator, dtype=torch.float64)
    tasks = torch.randn(3, 400, generator=generator, dtype=torch.float64) * 0.3
    lambdas = [1.2, 0.8, 1.0]
    params = PCBParams(density=ratio, clamp_fraction=eps, inter_balancing="pairwise" if pairwise else "sum")
    merged = pcb_merge(base, [base + t for t in tasks], lambdas, params)
    expected, scale = reference_pcb(tasks, ratio, eps, lambdas, pairwise)
    torch.testing.assert_close(merged, base + expected)
    if ratio < 1:  # drop: only the top r fraction of each row keeps a non-zero balancing weight
        assert all(int((row > 0).sum()) <= int(ratio * 400) for row in scale)


def test_pcb_single_hand_checkable_case():
    # one task, no clamping, keep everything: the weights β̂ cancel in Σ β̂ T / Σ β̂ wherever β̂ > 0
    base = torch.zeros(4, dtype=torch.float64)
    task = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    merged = pcb_merge(base, [task], [1.0], PCBParams(density=1.0, clamp_fraction=0.0))
    # β = exp(Norm(|T|)²) · tanh(T²) is smallest at 0.1, whose β̂ = 0 after the min-max: dropped
    assert merged.tolist() == pytest.approx([0.5, -1.0, 2.0, 0.0])


def test_pcb_components_are_linear_in_the_coefficients():
    generator = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(30, 20, generator=generator), "b": torch.randn(50, generator=generator),
            "step": torch.tensor(3)}
    models = [{k: (v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v)
               for k, v in base.items()} for _ in range(3)]
    components = pcb_component_state_dict(base, models)
    assert set(components) == {"a", "b"} and components["a"].shape == (3, 30, 20)
    lambdas = [1.1, 0.9, 1.3]
    merged = merge_state_dicts("pcb", base, models, PCBParams(), [PCBModelParams(weight=w) for w in lambdas])
    applied = apply_coefficients(base, components, lambdas)
    for name in base:
        torch.testing.assert_close(applied[name], merged[name])


def test_pcb_model_scope_equals_pcb_on_the_flattened_model():
    generator = torch.Generator().manual_seed(2)
    base = {"a": torch.randn(40, 25, generator=generator), "b": torch.randn(300, generator=generator)}
    models = [{k: v + 0.2 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(2)]
    params = PCBParams(density=0.2, clamp_fraction=0.01, scope="model")
    merged = merge_state_dicts("pcb", base, models, params, [PCBModelParams(1.0), PCBModelParams(1.2)])
    flat_base = torch.cat([base["a"].reshape(-1), base["b"]])
    flat_models = [torch.cat([m["a"].reshape(-1), m["b"]]) for m in models]
    flat = pcb_merge(flat_base, flat_models, [1.0, 1.2], PCBParams(density=0.2, clamp_fraction=0.01))
    torch.testing.assert_close(torch.cat([merged["a"].reshape(-1), merged["b"]]), flat)


def test_search_coefficients_finds_the_optimum_inside_the_bounds():
    target = [1.1, 0.9, 1.25]
    result = search_coefficients(lambda x: -sum((a - b) ** 2 for a, b in zip(x, target)), 3, budget=150, seed=0)
    assert len(result.history) <= 150
    assert all(0.8 <= v <= 1.3 for v in result.best)
    assert result.best == pytest.approx(target, abs=0.05)
    single = search_coefficients(lambda x: -(x[0] - 1.0) ** 2, 1, budget=11)
    assert single.best == pytest.approx([1.0], abs=0.03) and len(single.history) == 11


def test_bfloat16_scores_do_not_flip_whole_deltas_at_the_drop_threshold():
    # found by the contract's bfloat16 check: scored in bfloat16, the entry at [2, 5] tied the drop threshold
    # in one model and lost that model's whole delta (0.875 off); exact-in-bfloat16 inputs, so only scoring differs
    base = torch.zeros(3, 6)
    base[2, 4:] = torch.tensor([0.875, 0.1875])
    tuned = [torch.zeros(3, 6), torch.zeros(3, 6), torch.zeros(3, 6)]
    tuned[1][2, 5], tuned[2][2, 5] = 0.0625, 1.875
    wide = merge_state_dicts("pcb", {"w": base}, [{"w": t} for t in tuned])["w"]
    half = merge_state_dicts("pcb", {"w": base.bfloat16()}, [{"w": t.bfloat16()} for t in tuned])["w"]
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), wide, rtol=2**-7, atol=2**-7)

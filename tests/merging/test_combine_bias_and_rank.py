"""combine_adapters reads the whole delta contract: the bias term (`delta_bias`) and the deltas' live rank."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from contract.toy_models import build
from deltatune.core.capabilities import HasRank
from deltatune.core.model import adapter_state
from deltatune.errors import ConfigError, NotMergeableError
from deltatune.merging.adapters import adapter_delta_weights, combine_adapters


def _perturb(model, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model, name):
            for parameter in delta.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _output_of(model, names, x) -> torch.Tensor:
    dt.set_active(model, names)
    return model(x).detach()


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf", "conv"])
def test_a_combined_bitfit_adapter_computes_what_the_bitfit_adapter_computes(kind):
    model, x = build(kind)
    base = model(x).detach()
    dt.adapt(model, dt.BitFitConfig(targets=["first", "second"]), name="bits")
    _perturb(model, "bits", seed=1)
    expected = _output_of(model, "bits", x)
    assert not torch.allclose(expected, base)
    combine_adapters(model, ["bits"], "combined", rank=1)
    torch.testing.assert_close(_output_of(model, "combined", x), expected, rtol=0, atol=1e-10)
    dt.merge(model)  # the bias term merges into the base bias
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)


def test_bitfit_and_lora_combine_by_task_arithmetic_into_one_adapter_with_both_terms():
    model, x = build("linear")
    dt.adapt(model, dt.BitFitConfig(targets=["first", "second"]), name="bits")
    dt.adapt(model, dt.LoRAConfig(rank=3, init="random", targets=["first", "second"]), name="low")
    _perturb(model, "bits", seed=1)
    combine_adapters(model, ["bits", "low"], "both", weights=[0.5, 1.5], rank=3)
    hosts = {path: host for path, host in dt.core.model.iter_hosts(model)}
    for host in hosts.values():
        bits, low, both = (host.deltas[n] for n in ("bits", "low", "both"))
        bias = host.base_layer.bias
        torch.testing.assert_close(both.delta_bias(bias), 0.5 * bits.delta_bias(bias), rtol=0, atol=1e-12)
        torch.testing.assert_close(both.delta_weight(host.base_layer.weight),
                                   1.5 * low.delta_weight(host.base_layer.weight), rtol=0, atol=1e-10)


def test_an_adapter_without_bias_terms_combines_into_a_lora_without_a_bias():
    model, _ = build("linear")
    dt.adapt(model, dt.LoRAConfig(rank=2, init="random", targets=["first"]), name="a")
    combine_adapters(model, ["a"], "copy")
    config = adapter_state(model).configs["copy"]
    assert config.bias is False and "lora_bias" not in " ".join(dt.adapter_state_dict(model, "copy"))


def test_bitfit_merge_writes_exactly_b_plus_delta_b_and_unmerge_restores_it():
    model, x = build("linear")
    reference = copy.deepcopy(model)
    dt.adapt(model, dt.BitFitConfig(targets=["first", "second"]))
    _perturb(model, "default", seed=3)
    expected = model(x).detach()
    deltas = {path: delta for path, _, delta in dt.iter_deltas(model)}
    dt.merge(model)
    for path, delta in deltas.items():
        merged_bias = model.get_submodule(path).base_layer.bias
        assert torch.equal(merged_bias, reference.get_submodule(path).bias + delta.bias_delta)
        assert torch.equal(model.get_submodule(path).base_layer.weight, reference.get_submodule(path).weight)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    dt.unmerge(model)
    for path in deltas:
        torch.testing.assert_close(model.get_submodule(path).base_layer.bias, reference.get_submodule(path).bias,
                                   rtol=0, atol=1e-15)


def test_a_bias_term_on_a_layer_without_bias_is_not_mergeable_and_leaves_the_layer_alone():
    model = nn.Sequential(nn.Linear(6, 5, bias=False)).double()
    dt.adapt(model, dt.LoRAConfig(rank=2, bias=True, init="random", targets=["0"]))
    _perturb(model, "default", seed=4)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x).detach()
    weight = model[0].base_layer.weight.detach().clone()
    with pytest.raises(NotMergeableError, match="changes a bias the base layer does not have"):
        dt.merge(model)
    assert torch.equal(model[0].base_layer.weight, weight)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_a_lora_bias_term_is_scale_times_lora_bias_on_every_path():
    model, x = build("linear")
    reference = copy.deepcopy(model)
    dt.adapt(model, dt.LoRAConfig(rank=2, alpha=6.0, bias=True, init="random", targets=["second"]))
    _perturb(model, "default", seed=5)
    delta = model.second.deltas["default"]
    hidden = torch.tanh(reference.first(x))
    weight = reference.second.weight + 3.0 * delta.lora_B @ delta.lora_A
    expected = hidden @ weight.T + reference.second.bias + 3.0 * delta.lora_bias
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)  # the fused path
    torch.testing.assert_close(model.second.base_layer(hidden) + delta(hidden), expected, rtol=0, atol=1e-12)


# --- the live rank: the AdaLoRA family is combined at the rank its deltas hold now ------------------------------
RANKED = {
    "adalora": dict(init_rank=4, target_rank=2),
    "increlora": dict(advance_learning=False),  # its held reserves otherwise add 1e-5 terms beyond the live rank
    "triadaptlora": {},
    "colora": dict(rank=3),
}


def _ranked_adapter(method: str):
    model, x = build("linear")
    dt.adapt(model, dt.config_for(method, targets=["first", "second"], **RANKED[method]), name="ranked")
    _perturb(model, "ranked", seed=6)
    return model, x


@pytest.mark.parametrize("method", sorted(RANKED))
def test_an_adalora_family_adapter_combines_exactly_at_its_live_rank(method):
    model, x = _ranked_adapter(method)
    deltas = {path: delta for path, _, delta in dt.iter_deltas(model, "ranked")}
    assert all(isinstance(delta, HasRank) for delta in deltas.values())
    live = max(delta.rank for delta in deltas.values())
    expected = _output_of(model, "ranked", x)
    combine_adapters(model, ["ranked"], "combined")
    assert adapter_state(model).configs["combined"].rank == live
    original, combined = adapter_delta_weights(model, "ranked"), adapter_delta_weights(model, "combined")
    for path in original:
        torch.testing.assert_close(combined[path], original[path], rtol=0, atol=1e-10)
    torch.testing.assert_close(_output_of(model, "combined", x), expected, rtol=0, atol=1e-10)


def test_a_pruned_adalora_adapter_is_combined_at_its_pruned_rank_per_layer():
    model, _ = _ranked_adapter("adalora")
    keep = {"first": torch.tensor([True, False, False, True]), "second": torch.tensor([False, False, True, False])}
    for path, _, delta in dt.iter_deltas(model, "ranked"):
        delta.prune_components(keep[path])
    dt.adapt(model, dt.LoRAConfig(rank=2, init="random", targets=["first", "second"]), name="low")
    combine_adapters(model, ["ranked", "low"], "both")
    assert adapter_state(model).configs["both"].rank == 2 + 2  # the larger per-layer sum: first has 2 live
    ranked, low, both = (adapter_delta_weights(model, n) for n in ("ranked", "low", "both"))
    for path in both:
        torch.testing.assert_close(both[path], ranked[path] + low[path], rtol=0, atol=1e-10)


def test_an_adapter_without_a_rank_still_asks_for_one():
    model, _ = build("linear")
    dt.adapt(model, dt.BitFitConfig(targets=["first"]), name="bits")
    with pytest.raises(ConfigError, match="do not all have a rank; pass rank="):
        combine_adapters(model, ["bits"], "combined")

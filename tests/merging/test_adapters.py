"""Combining adapters into a new LoRA adapter: exactness, the merge methods on ΔW, peft's add_weighted_adapter."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from contract.toy_models import build
from deltatune.errors import AdapterNameError, ConfigError
from deltatune.merging.adapters import adapter_delta_weights, combine_adapters
from deltatune.merging.methods.ties import TiesModelParams, TiesParams, ties_merge


def _two_loras(kind: str, ranks=(2, 3), seed: int = 0):
    model, x = build(kind, seed)
    reference = copy.deepcopy(model)
    torch.manual_seed(seed + 1)
    for name, rank in zip(("a", "b"), ranks):
        dt.adapt(model, dt.LoRAConfig(rank=rank, alpha=2.0 * rank, init="random", targets=["first", "second"]),
                 name=name)
    return reference, model, x


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf", "conv", "conv1d", "embedding"])
def test_task_arithmetic_at_summed_rank_is_exact(kind):
    _, model, x = _two_loras(kind)
    combine_adapters(model, ["a", "b"], "both", weights=[0.7, -0.4])
    a, b, both = (adapter_delta_weights(model, name) for name in ("a", "b", "both"))
    for path in both:
        torch.testing.assert_close(both[path], 0.7 * a[path] - 0.4 * b[path], rtol=0, atol=1e-10)
    assert dt.active_adapters(model) == ("b",)  # the active set is unchanged
    dt.set_active(model, "both")
    output = model(x)
    dt.merge(model)
    torch.testing.assert_close(model(x), output, rtol=0, atol=1e-10)


def test_lower_rank_is_the_best_approximation_and_adapters_stay_untouched():
    _, model, _ = _two_loras("linear", ranks=(4, 4))
    before = {k: v.clone() for k, v in dt.adapter_state_dict(model, "a").items()}
    combine_adapters(model, ["a", "b"], "low", rank=2)
    target = {p: a + b for (p, a), b in zip(adapter_delta_weights(model, "a").items(),
                                            adapter_delta_weights(model, "b").values())}
    for path, delta in adapter_delta_weights(model, "low").items():
        values = torch.linalg.svdvals(target[path])
        # Eckart–Young: the Frobenius error of the best rank-2 approximation is the norm of the tail values
        torch.testing.assert_close(torch.linalg.matrix_norm(target[path] - delta), values[2:].norm(), rtol=1e-9,
                                   atol=1e-12)
    for key, value in dt.adapter_state_dict(model, "a").items():
        assert torch.equal(value, before[key])


def _best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    return left[:, :rank] * values[:rank] @ right[:rank]


def test_ties_on_delta_weights_is_the_tensor_function_then_the_best_rank_r_approximation():
    _, model, _ = _two_loras("linear", ranks=(3, 3))
    params = TiesParams(trim_scope="tensor")
    combine_adapters(model, ["a", "b"], "ties", method="ties", rank=7, params=params,
                     model_params=[TiesModelParams(weight=1.0, density=0.5)] * 2)
    a, b = adapter_delta_weights(model, "a"), adapter_delta_weights(model, "b")
    for path, delta in adapter_delta_weights(model, "ties").items():
        expected = ties_merge(torch.zeros_like(a[path]), [a[path], b[path]], weights=[1.0, 1.0],
                              densities=[0.5, 0.5], params=params)
        assert torch.linalg.matrix_rank(expected) > 7  # trimming made it full rank: the SVD step matters
        torch.testing.assert_close(delta, _best_rank(expected, 7), rtol=0, atol=1e-10)


def test_combining_a_sparse_adapter_needs_a_rank():
    model, _ = build("linear")
    dt.adapt(model, dt.config_for("sara", fraction=0.2, targets=["first", "second"]), name="sparse")
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first", "second"]), name="low")
    with pytest.raises(ConfigError, match="pass rank="):
        combine_adapters(model, ["sparse", "low"], "both")
    combine_adapters(model, ["sparse", "low"], "both", rank=4)
    assert "both" in dt.adapter_names(model)


def test_bad_input_changes_nothing():
    _, model, _ = _two_loras("linear")
    with pytest.raises(AdapterNameError, match="'c'"):
        combine_adapters(model, ["a", "c"], "both")
    with pytest.raises(AdapterNameError, match="already exists"):
        combine_adapters(model, ["a", "b"], "a")
    with pytest.raises(ConfigError, match="2 weights for 1"):
        combine_adapters(model, ["a"], "both", weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="twice"):
        combine_adapters(model, ["a", "a"], "both")
    dt.adapt(model, dt.LoRAConfig(rank=2, targets=["first"]), name="first_only")
    with pytest.raises(ConfigError, match="same modules"):
        combine_adapters(model, ["a", "first_only"], "both")
    assert dt.adapter_names(model) == ["a", "b", "first_only"]


@pytest.mark.parametrize("combination, rank, ours", [
    ("cat", None, {}),
    ("svd", 2, {}),
    # peft's weighted TIES: Σ_agreeing w_i δ_i / |A|, the sign from the unweighted trimmed deltas
    ("ties_svd", 5, dict(method="ties", density=0.5, params=TiesParams(trim_scope="tensor", normalize="count"))),
    ("magnitude_prune_svd", 5, dict(method="magnitude_prune", density=0.5)),
])
def test_equals_peft_add_weighted_adapter(tmp_path, combination, rank, ours):
    peft = pytest.importorskip("peft")
    reference, model, x = _two_loras("linear")
    for name in ("a", "b"):
        dt.save_adapter(model, tmp_path / name, name=name, format="peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    # weights exact in float32: peft's svd path holds them in a float32 tensor
    theirs.add_weighted_adapter(["a", "b"], [0.75, 0.25], "both", combination_type=combination, svd_rank=rank,
                                density=ours.get("density"))
    theirs.set_adapter("both")
    combine_adapters(model, ["a", "b"], "both", weights=[0.75, 0.25], rank=rank, **ours)
    dt.set_active(model, "both")
    torch.testing.assert_close(model(x), theirs(x), rtol=0, atol=1e-10)


def test_density_is_refused_where_it_has_no_meaning():
    _, model, _ = _two_loras("linear")
    with pytest.raises(ConfigError, match="'linear' does not trim"):
        combine_adapters(model, ["a", "b"], "both", method="linear", density=0.5)
    with pytest.raises(ConfigError, match="density is ignored when model_params is given"):
        combine_adapters(model, ["a", "b"], "both", method="ties", density=0.5,
                         model_params=[TiesModelParams(density=0.3)] * 2)
    assert dt.adapter_names(model) == ["a", "b"]


def test_combined_adapter_covers_exactly_the_adapted_modules():
    """A path list would match `inner.first` by suffix too; the combined adapter adapts only `first`."""
    model = torch.nn.ModuleDict({"first": torch.nn.Linear(6, 5), "inner": torch.nn.ModuleDict(
        {"first": torch.nn.Linear(6, 5)})}).double()
    for name in ("a", "b"):
        dt.adapt(model, dt.LoRAConfig(rank=2, init="random", targets=r"first"), name=name)
    combine_adapters(model, ["a", "b"], "both")
    assert list(adapter_delta_weights(model, "both")) == ["first"]

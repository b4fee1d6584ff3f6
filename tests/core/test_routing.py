"""Mixed-adapter batches (`deltatune.route`): every registered method × layer kind that can route gives, row by
row, what running that row alone with its adapter active gives; the others refuse by name."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from contract.toy_models import LAYER_CASES, build
from deltatune.core.host import AdaptedLayer
from deltatune.errors import RoutingError

CASES = [(entry.name, case) for entry in dt.list_methods() for case in LAYER_CASES
         if LAYER_CASES[case] in entry.delta_cls.layer_kinds]


def _two_adapters(method: str, case: str):
    base, x = build(case, seed=0)
    model = copy.deepcopy(base)
    for seed, name in enumerate(("a", "b"), start=1):
        dt.adapt(model, dt.config_for(method, targets=None, layer_types=(LAYER_CASES[case],)), name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, _, delta in dt.iter_deltas(model, name):
                for parameter in delta.parameters():
                    if parameter.is_floating_point():
                        parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model.eval(), x


def _routable(model) -> bool:
    return all(delta.routes_per_sample for _, _, delta in dt.iter_deltas(model))


def _names(batch: int) -> list[str]:
    return [("a", "b", "base")[i % 3] for i in range(batch)] if batch > 2 else ["b", "a"][:batch]


def _alone(model, x, name: str, row: int):
    if name == "base":
        with dt.disabled(model):
            return model(x[row:row + 1])
    dt.set_active(model, [name])
    return model(x[row:row + 1])


@pytest.mark.parametrize("method,case", CASES)
def test_a_mixed_batch_equals_each_row_alone_or_is_refused_by_name(method, case):
    model, x = _two_adapters(method, case)
    names = _names(x.shape[0])
    if not _routable(model):
        with pytest.raises(RoutingError, match=rf"\({method}\) cannot be routed per sample"):
            with dt.route(model, names):
                pass
        assert all(host.routes is None for host in model.modules() if isinstance(host, AdaptedLayer))
        return
    with torch.no_grad():
        with dt.route(model, names):
            mixed = model(x)
        alone = torch.cat([_alone(model, x, name, row) for row, name in enumerate(names)])
    torch.testing.assert_close(mixed, alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(mixed, dt.set_active(model, ["a"]) or model(x)), "routing changed nothing"


def test_routing_costs_nothing_after_the_block_and_the_active_adapter_is_back():
    model, x = _two_adapters("lora", "linear")
    dt.set_active(model, ["b"])
    before = model(x)
    with dt.route(model, ["a"] * x.shape[0]):
        routed = model(x)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    dt.set_active(model, ["a"])
    torch.testing.assert_close(routed, model(x), rtol=1e-12, atol=1e-12)


def test_gradients_of_each_adapter_come_from_its_own_rows_only():
    model, x = _two_adapters("lora", "linear")
    dt.set_trainable(model, "a")
    for _, _, delta in dt.iter_deltas(model, "b"):
        delta.requires_grad_(True)
    with dt.route(model, ["a", "a", "b", "b", "base"]):
        out = model(x)
    out[:2].sum().backward()  # rows of "a" only
    grads = {name: [p.grad for _, _, d in dt.iter_deltas(model, name) for p in d.parameters()] for name in "ab"}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["a"])
    assert all(g is None or g.abs().sum() == 0 for g in grads["b"])


@pytest.mark.parametrize("names,message", [
    (["a", "nope", "a", "a", "a"], r"no adapter named 'nope'"),
    ([], r"adapter_names is empty"),
])
def test_bad_names_are_refused_by_name(names, message):
    model, _ = _two_adapters("lora", "linear")
    with pytest.raises(RoutingError, match=message):
        with dt.route(model, names):
            pass


def test_a_batch_of_another_size_is_refused():
    model, x = _two_adapters("lora", "linear")
    with pytest.raises(RoutingError, match="batch of 5 rows but 3 adapter names"):
        with dt.route(model, ["a", "b", "a"]):
            model(x)


def test_merged_adapters_are_refused():
    model, _ = _two_adapters("lora", "linear")
    dt.merge(model)
    with pytest.raises(RoutingError, match="merged"):
        with dt.route(model, ["a"] * 5):
            pass


INPUT_SIDE = [entry.name for entry in dt.list_methods()
              if entry.delta_cls.kind is dt.DeltaKind.INPUT and "module" in entry.delta_cls.layer_kinds]


@pytest.mark.parametrize("method", INPUT_SIDE)
def test_input_side_methods_are_refused_by_name(method):
    from contract.test_input_side import _adapted_or_refusal

    for case in ("bert", "vit", "llama"):
        model, _, refusal = _adapted_or_refusal(method, case)
        if model is not None:
            break
    assert model is not None, f"{method} runs on none of the toy models"
    with pytest.raises(RoutingError, match=rf"\({method}\) cannot be routed per sample: its input-side delta"):
        with dt.route(model, ["default", "base"]):
            pass

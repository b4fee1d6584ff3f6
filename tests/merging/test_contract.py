"""The merge-method contract: every registered merge method (deltatune.merging.registry) against the same rules.

A new method joins this matrix by registering; what it may be expected to do is declared at registration
(`stochastic`, `self_merge`), never listed here. Rules: self-merge is the identity where the method declares
it; the seed fixes the output (and changes it for stochastic methods only); shape and dtype hold; finite
inputs give finite outputs; streaming over safetensors shards gives the in-memory tensors bit for bit;
bfloat16 inputs give bfloat16 outputs close to the float32 merge; bad parameter values are refused with a
ConfigError naming the parameter.
"""
from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError
from deltatune.merging import config_from_dict, list_merge_methods, merge_state_dicts, run_merge
from merging.tiny_checkpoints import load_folder, make_models

METHODS = list_merge_methods()
NAMES = [spec.name for spec in METHODS]
BY_NAME = {spec.name: spec for spec in METHODS}
PROPERTY = settings(derandomize=True, max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _with(cls: type, values: dict) -> object:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})


def _params(spec, count: int, overrides: dict | None = None, weights: list[float] | None = None):
    """(shared params, per-model params): the method's defaults, with `overrides` on whichever class has the
    field, and per-model `weight`s when the method has that field."""
    overrides = overrides or {}
    model_params = []
    for index in range(count):
        values = dict(overrides)
        if weights is not None:
            values["weight"] = weights[index]
        model_params.append(_with(spec.model_params_cls, values))
    return _with(spec.params_cls, overrides), model_params


def _count(spec, wanted: int) -> int:
    wanted = max(wanted, spec.min_models)
    return wanted if spec.max_models is None else min(wanted, spec.max_models)


def _state(values: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"w": values}


@st.composite
def tensor_groups(draw, dtype=torch.float64, grid=False):
    """(base, [fine-tunes]) of one small shape (0-d to 3-d), with ties, zeros and unchanged entries likely.
    grid: values are multiples of 1/16 in [-4, 4], exact in bfloat16, so are their differences."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    numel = math.prod(shape)
    if grid:
        element = st.integers(-64, 64).map(lambda k: k / 16)
    else:
        element = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]),
                            st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32))
    count = draw(st.integers(1, 3))
    tensors = [torch.tensor(draw(st.lists(element, min_size=numel, max_size=numel)), dtype=dtype).reshape(shape)
               for _ in range(count + 1)]
    return tensors[0], tensors[1:]


@pytest.mark.parametrize("name", NAMES)
def test_self_merge_is_the_identity_where_declared(name):
    spec = BY_NAME[name]
    if spec.self_merge is None:
        pytest.skip(f"{name} declares no self_merge setting (it always drops or rescales something)")

    @PROPERTY
    @given(group=tensor_groups(), copies=st.integers(1, 3))
    def check(group, copies):
        base, (tuned, *_) = group
        copies = _count(spec, copies)
        params, model_params = _params(spec, copies, spec.self_merge, [1.0 / copies] * copies)
        merged = merge_state_dicts(name, _state(base), [_state(tuned)] * copies, params, model_params)
        torch.testing.assert_close(merged["w"], tuned, rtol=1e-12, atol=1e-12)

    check()


def _random_group(count: int, shape=(16, 16), dtype=torch.float64):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=generator, dtype=dtype)
    return _state(base), [_state(base + torch.randn(shape, generator=generator, dtype=dtype)) for _ in range(count)]


@pytest.mark.parametrize("name", NAMES)
def test_the_seed_fixes_the_output(name):
    spec = BY_NAME[name]
    base, models = _random_group(_count(spec, 2))
    first = merge_state_dicts(name, base, models, seed=1)["w"]
    again = merge_state_dicts(name, base, models, seed=1)["w"]
    other = merge_state_dicts(name, base, models, seed=2)["w"]
    assert torch.equal(first, again)
    assert torch.equal(first, other) != spec.stochastic, (
        f"{name} is registered with stochastic={spec.stochastic}, but another seed "
        f"{'gave the same' if spec.stochastic else 'changed the'} output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_shape_and_dtype_hold_and_finite_inputs_give_finite_outputs(name, dtype):
    spec = BY_NAME[name]

    @PROPERTY  # float16 on the grid: values that DARE's 1/(1 - p) rescale keeps inside float16's range
    @given(group=tensor_groups(dtype, grid=dtype == torch.float16))
    def check(group):
        base, tuned = group
        tuned = (tuned * _count(spec, len(tuned)))[: _count(spec, len(tuned))]
        merged = merge_state_dicts(name, _state(base), [_state(t) for t in tuned])["w"]
        assert merged.shape == base.shape and merged.dtype == dtype
        assert torch.isfinite(merged).all(), merged

    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_streaming_equals_the_in_memory_merge(name, dtype, tmp_path):
    spec = BY_NAME[name]
    base_dir, dirs, base, tuned = make_models(tmp_path, count=_count(spec, 2), dtype=dtype)
    raw = {"merge_method": name, "base_model": str(base_dir), "semantics": "paper", "seed": 3,
           "models": [{"model": str(folder)} for folder in dirs]}
    run_merge(config_from_dict(raw, None, yaml.safe_dump(raw)), tmp_path / "out", shard_bytes=400, progress=False)
    streamed = load_folder(tmp_path / "out")
    expected = merge_state_dicts(name, base, tuned, seed=3)
    assert set(streamed) == set(expected)
    for key, value in expected.items():
        assert torch.equal(streamed[key], value), key


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs_give_bfloat16_close_to_float32(name):
    spec = BY_NAME[name]

    @PROPERTY
    @given(group=tensor_groups(torch.float32, grid=True))
    def check(group):
        base, tuned = group
        tuned = (tuned * _count(spec, len(tuned)))[: _count(spec, len(tuned))]
        wide = merge_state_dicts(name, _state(base), [_state(t) for t in tuned], seed=5)["w"]
        half = merge_state_dicts(name, _state(base.bfloat16()), [_state(t.bfloat16()) for t in tuned], seed=5)["w"]
        assert half.dtype == torch.bfloat16 and half.shape == wide.shape
        scale = max(float(wide.abs().max()) if wide.numel() else 0.0, 1.0)
        torch.testing.assert_close(half.float(), wide, rtol=2**-6, atol=2**-6 * scale)

    check()


def _bad_values(hint: object) -> list[object]:
    """Values no field of this annotated type may accept: the wrong type, and NaN / ∞ for numbers."""
    kinds = set(typing.get_args(hint)) or {hint}
    bad: list[object] = []
    if kinds & {float, int}:
        bad += ["a string", float("nan"), float("inf")]
    if bool in kinds:
        bad += ["a string"] if str not in kinds else []
        bad += [0.5] if not kinds & {float, int} else []
    if str in kinds:
        bad += ["no such choice", 3] if not kinds & {float, int} else []
    return list(dict.fromkeys(bad, None))


def _field_cases():
    for spec in METHODS:
        for role, cls in (("params", spec.params_cls), ("model_params", spec.model_params_cls)):
            hints = typing.get_type_hints(cls)
            for item in dataclasses.fields(cls):
                for value in _bad_values(hints[item.name]):
                    yield pytest.param(cls, item.name, value, id=f"{spec.name}-{role}-{item.name}={value!r}")


@pytest.mark.parametrize("cls,field,value", list(_field_cases()))
def test_bad_parameters_are_refused_naming_the_parameter(cls, field, value):
    with pytest.raises(ConfigError) as caught:
        cls(**{field: value})
    assert str(caught.value).startswith(f"{field}="), str(caught.value)


def test_every_method_has_bad_value_cases():
    """The case generator must reach every method (a field type it cannot read would drop cases silently)."""
    covered = {case.id.split("-")[0] for case in _field_cases()}
    assert covered == set(NAMES)

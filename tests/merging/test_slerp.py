"""SLERP against a float64 reference of Shoemake's formula, mergekit's colinear fallback and per-layer t, the
float32 torch arithmetic mergekit 0.1.5 uses, and refusals."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError, MergeError
from deltatune.merging import config_from_dict, merge_state_dicts, run_merge
from deltatune.merging.methods.slerp import SlerpParams, slerp
from merging.tiny_checkpoints import LAYERS, load_folder, make_models


def reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1 in float64, θ the angle between the flattened tensors."""
    a, b = v0.double().flatten(), v1.double().flatten()
    cosine = float(a @ b / (a.norm() * b.norm()))
    if abs(cosine) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).reshape(v0.shape)
    theta = math.acos(cosine)
    return (math.sin((1 - t) * theta) * v0.double() + math.sin(t * theta) * v1.double()) / math.sin(theta)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(t=st.floats(0, 1), shape=st.sampled_from([(7,), (4, 5), (2, 3, 3)]), seed=st.integers(0, 10_000))
def test_slerp_is_shoemakes_formula_in_float64(t, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    v0, v1 = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(slerp(t, v0, v1), reference(t, v0, v1), rtol=1e-10, atol=1e-10)


def test_the_arc_keeps_the_norm_of_unit_vectors_and_ends_at_both_models():
    v0, v1 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    middle = slerp(0.5, v0, v1)
    torch.testing.assert_close(middle, torch.tensor([0.5**0.5, 0.5**0.5], dtype=torch.float64))
    assert torch.equal(slerp(0.0, v0, v1), v0) and torch.equal(slerp(1.0, v0, v1), v1)


def test_nearly_colinear_tensors_are_interpolated_linearly():
    v0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    v1 = 2 * v0 + 1e-6  # cos θ ≈ 1: the arc's 1/sin θ would blow up
    torch.testing.assert_close(slerp(0.25, v0, v1), 0.75 * v0 + 0.25 * v1, rtol=0, atol=0)


def test_float32_and_bfloat16_follow_mergekits_float32_torch_arithmetic():
    """mergekit 0.1.5 runs the formula in float32 torch (norms, dot of the normalized copies, float32 angle and
    coefficients): the same sequence written out here must give the same bits (real mergekit-yaml output is
    compared in test_mergekit_parity.py)."""
    generator = torch.Generator().manual_seed(3)
    v0, v1 = torch.randn(64, 32, generator=generator), torch.randn(64, 32, generator=generator)
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([[0.3]])
    dot = ((a / torch.linalg.vector_norm(a, dim=1, keepdim=True))
           * (b / torch.linalg.vector_norm(b, dim=1, keepdim=True))).sum(dim=1, keepdim=True)
    theta = torch.acos(dot)
    expected = torch.sin((1 - t) * theta) / torch.sin(theta) * a + torch.sin(t * theta) / torch.sin(theta) * b
    assert torch.equal(slerp(0.3, v0, v1), expected.reshape(v0.shape))
    half = slerp(0.3, v0.bfloat16(), v1.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference(0.3, v0.bfloat16(), v1.bfloat16()).float(), rtol=2**-7, atol=0)


def test_tensors_longer_than_a_chunk_take_the_norm_of_chunk_norms():
    generator = torch.Generator().manual_seed(4)
    v0, v1 = (torch.randn(3, (1 << 20) // 3 + 5, generator=generator, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(slerp(0.7, v0, v1), reference(0.7, v0, v1), rtol=1e-10, atol=1e-10)


def test_a_yaml_gradient_gives_each_layer_its_own_t(tmp_path):
    base_dir, (tuned_dir,), base, (tuned,) = make_models(tmp_path, count=1)
    config = config_from_dict({"merge_method": "slerp", "base_model": str(base_dir),
                               "models": [{"model": str(tuned_dir)}],
                               "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]},
                                                    {"value": 0.5}]}})
    out = load_folder(run_merge(config, tmp_path / "out", progress=False).out_dir)
    for layer in range(LAYERS):
        t = layer / (LAYERS - 1)  # the gradient [0, 1] over the layer index
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(out[name], slerp(t, base[name], tuned[name]), rtol=0, atol=0)
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[name], slerp(0.5, base[name], tuned[name]), rtol=0, atol=0)


def test_more_than_one_model_or_t_outside_the_arc_is_refused_by_name():
    base = {"w": torch.randn(3)}
    with pytest.raises(MergeError, match="exactly one model"):
        merge_state_dicts("slerp", base, [{"w": torch.randn(3)}, {"w": torch.randn(3)}])
    with pytest.raises(ConfigError, match="^t="):
        SlerpParams(t=1.5)
    with pytest.raises(MergeError, match="needs a base"):
        merge_state_dicts("slerp", None, [{"w": torch.randn(3)}])

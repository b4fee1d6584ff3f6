"""SLERP against a float64 transcription of mergekit 0.1.5's slerp(), gradients over layers, and bad inputs.

Not yet checked: bit-identity against an actual mergekit-yaml run (no mergekit venv on this branch yet).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.merging import config_from_dict, run_merge
from deltatune.merging.config.resolve import layer_position
from deltatune.merging.methods.slerp import SlerpParams, slerp
from merging.tiny_checkpoints import load_folder, make_models


def reference_slerp(t, v0, v1):
    """mergekit's slerp(): normalise flattened copies (unless norm <= 1e-8), lerp if |dot| > 0.9995, else the
    sin-weighted sum of the *original* tensors — in float64."""
    a, b = np.asarray(v0, np.float64).ravel(), np.asarray(v1, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = (a / na if na > 1e-8 else a), (b / nb if nb > 1e-8 else b)
    dot = float(np.sum(ua * ub))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(np.shape(v0))
    omega = math.acos(dot)
    return ((math.sin(omega - omega * t) * a + math.sin(omega * t) * b) / math.sin(omega)).reshape(np.shape(v0))


@settings(max_examples=40, deadline=None)
@given(t=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_slerp_matches_the_reference(t, seed):
    generator = torch.Generator().manual_seed(seed)
    v0, v1 = torch.randn(2, 6, 30, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(slerp(t, v0, v1).double(), torch.from_numpy(reference_slerp(t, v0, v1)),
                               rtol=1e-5, atol=1e-5)


def test_slerp_endpoints_colinear_fallback_and_norm_preservation():
    generator = torch.Generator().manual_seed(1)
    v0, v1 = torch.randn(2, 500, generator=generator)
    assert torch.allclose(slerp(0.0, v0, v1), v0, atol=1e-6) and torch.allclose(slerp(1.0, v0, v1), v1, atol=1e-6)
    # equal-norm inputs stay on the sphere (lerp would shrink the midpoint)
    u0, u1 = v0 / v0.norm(), v1 / v1.norm()
    assert abs(slerp(0.5, u0, u1).norm().item() - 1.0) < 1e-5 and (0.5 * (u0 + u1)).norm() < 0.9
    # near-colinear: exactly mergekit's lerp branch
    near = 2.0 * v0 + 1e-4 * v1
    assert torch.equal(slerp(0.3, v0, near), 0.7 * v0 + 0.3 * near)


def test_slerp_gradient_over_layers_in_a_streamed_merge(tmp_path):
    base_dir, dirs, base, tuned = make_models(tmp_path)
    raw = {"merge_method": "slerp", "base_model": str(base_dir), "models": [{"model": str(dirs[0])}],
           "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}}
    merged = load_folder(run_merge(config_from_dict(raw, None, yaml.safe_dump(raw)), tmp_path / "out",
                                   progress=False).out_dir)
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            continue
        t = layer_position(name, 3) if "self_attn" in name else 0.3
        expected = torch.from_numpy(reference_slerp(t, tensor, tuned[0][name])).to(tensor.dtype)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_slerp_rejects_t_outside_the_unit_interval():
    with pytest.raises(ConfigError, match="t"):
        SlerpParams(t=1.5)


def test_slerp_rejects_three_models(tmp_path):
    base_dir, dirs, _, _ = make_models(tmp_path)
    raw = {"merge_method": "slerp", "base_model": str(base_dir), "models": [{"model": str(d)} for d in dirs[:2]],
           "parameters": {"t": 0.5}}
    with pytest.raises(DeltatuneError, match="exactly two models"):
        run_merge(config_from_dict(raw), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

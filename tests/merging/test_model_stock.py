"""Model Stock against a float64 transcription of mergekit 0.1.5's model_stock task, and its bad inputs.

Bit-identity against real mergekit-yaml output: tests/merging/test_mergekit_parity.py.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.errors import DeltatuneError
from deltatune.merging import merge_state_dicts
from deltatune.merging.methods.model_stock import ModelStockModelParams, ModelStockParams, model_stock_merge


def reference_model_stock(base, tuned, filter_wise):
    """Offsets from the base, mean pairwise cosine (norm product >= 1e-6, clamp [-1, 1]), t = N c/(1+(N-1)c)."""
    w0 = np.asarray(base, np.float64)
    shape = w0.shape
    rows = (w0[None] if w0.ndim == 1 else w0) if filter_wise else w0.reshape(1, -1)
    ws = [((np.asarray(t)[None] if w0.ndim == 1 else np.asarray(t)) if filter_wise else np.asarray(t).reshape(1, -1))
          for t in tuned]
    deltas = [w - rows for w in ws]
    cos = np.mean([np.clip((a * b).sum(-1) / max_floor(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)),
                           -1, 1) for a, b in itertools.combinations(deltas, 2)], axis=0)[:, None]
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * (sum(ws) / n) + (1 - t) * rows).reshape(shape)


def max_floor(x):
    return np.maximum(x, 1e-6)


@settings(max_examples=40, deadline=None)
@given(count=st.integers(2, 4), filter_wise=st.booleans(), vector=st.booleans(), seed=st.integers(0, 10_000))
def test_model_stock_matches_the_reference(count, filter_wise, vector, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (40,) if vector else (5, 12)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    common = torch.randn(shape, generator=generator, dtype=torch.float64)  # shared direction: positive cosines
    tuned = [base + common + 0.7 * torch.randn(shape, generator=generator, dtype=torch.float64)
             for _ in range(count)]
    merged = model_stock_merge(base, tuned, filter_wise)
    expected = torch.from_numpy(reference_model_stock(base.numpy(), [t.numpy() for t in tuned], filter_wise))
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)


def test_model_stock_two_orthogonal_models_keep_the_base_and_aligned_ones_take_the_average():
    base = torch.zeros(2, dtype=torch.float64)
    orthogonal = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)]
    assert torch.equal(model_stock_merge(base, orthogonal), base)  # cos 0 → t = 0
    aligned = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([2.0, 4.0], dtype=torch.float64)]
    torch.testing.assert_close(model_stock_merge(base, aligned), (aligned[0] + aligned[1]) / 2)  # cos 1 → t = 1
    # the paper's two-model ratio: 2 cos / (1 + cos) at cos = 0.5 is 2/3
    half = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 0.75 ** 0.5], dtype=torch.float64)]
    torch.testing.assert_close(model_stock_merge(base, half), (2 / 3) * (half[0] + half[1]) / 2)


def test_model_stock_keeps_the_base_where_the_ratio_is_undefined():
    base = torch.zeros(2, dtype=torch.float64)
    opposite = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 0.0], dtype=torch.float64)]
    assert torch.equal(model_stock_merge(base, opposite), base)  # cos −1, N = 2: 1 + cos = 0


def test_model_stock_in_float16_falls_back_to_float32_where_a_float16_norm_product_overflows():
    # offsets 200 and 100 over 16 entries: norms 800 and 400, their product and the dot product 320,000 > 65,504
    # (∞ in float16), so mergekit's float16 cosine is ∞/∞ = NaN; the float32 cosine is 1, t = 1: the average
    base = torch.zeros(16, dtype=torch.float16)
    aligned = [torch.full((16,), 200.0, dtype=torch.float16), torch.full((16,), 100.0, dtype=torch.float16)]
    merged = model_stock_merge(base, aligned)
    assert merged.dtype == torch.float16
    assert torch.equal(merged, torch.full((16,), 150.0, dtype=torch.float16))
    small = [t / 100 for t in aligned]  # no overflow: computed in float16 itself, as mergekit (same answer here)
    assert torch.equal(model_stock_merge(base, small), torch.full((16,), 1.5, dtype=torch.float16))


def test_model_stock_rejects_a_single_fine_tune():
    state = {"w": torch.ones(3)}
    with pytest.raises(DeltatuneError, match="at least two fine-tuned models"):
        merge_state_dicts("model_stock", state, [state], ModelStockParams(), [ModelStockModelParams()])

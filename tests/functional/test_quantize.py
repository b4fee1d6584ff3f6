"""Quantization math: the NF4 codebook's construction, error bounds (hypothesis), packing round trips."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltatune.functional import quantize as q


def test_nf4_codebook_has_16_sorted_values_in_the_unit_interval_with_an_exact_zero():
    codebook = q.nf4_codebook(torch.float64)
    assert codebook.shape == (16,)
    assert torch.all(codebook[1:] > codebook[:-1])
    assert codebook[0] == -1.0 and codebook[-1] == 1.0
    assert (codebook == 0).sum() == 1
    assert (codebook > 0).sum() == 8 and (codebook < 0).sum() == 7  # the asymmetric split of QLoRA §3


def test_nf4_codebook_is_built_from_normal_quantiles_at_equally_spaced_probabilities():
    codebook = q.nf4_codebook(torch.float64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    # undo the normalization: both ends are the same quantile, so codebook * that quantile are N(0,1) quantiles
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    end = normal.icdf(torch.tensor(delta, dtype=torch.float64))
    probabilities_positive = normal.cdf(codebook[8:] * end)  # 8 positive values
    probabilities_negative = normal.cdf(-codebook[:7] * end)  # the 7 negative ones, mirrored
    steps_positive = probabilities_positive.diff()
    steps_negative = probabilities_negative.diff()
    torch.testing.assert_close(steps_positive, torch.full_like(steps_positive, (delta - 0.5) / 8), rtol=1e-9, atol=0)
    torch.testing.assert_close(steps_negative, -torch.full_like(steps_negative, (delta - 0.5) / 7), rtol=1e-9, atol=0)
    # the symmetric quantile construction: the negative half is the mirror of a 7-step grid, the positive of 8
    assert probabilities_positive[0] == pytest.approx(0.5 + (delta - 0.5) / 8, abs=1e-12)
    # and the published NF4 values (QLoRA appendix E, bitsandbytes) to float32 precision
    assert float(codebook[1]) == pytest.approx(-0.6961928009986877, abs=1e-6)
    assert float(codebook[14]) == pytest.approx(0.7229568362236023, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 150), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_nf4_error_is_within_half_the_widest_codebook_gap_of_each_block_absmax(rows, cols, scale, seed):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    packed, absmax = q.quantize_nf4(weight)
    restored = q.dequantize_nf4(packed, absmax, weight.shape)
    blocks = q._blocks(weight.reshape(-1), q.NF4_BLOCKSIZE)
    bound = blocks.abs().amax(1, keepdim=True) * q.nf4_max_half_gap() * (1 + 1e-12)
    error = q._blocks((restored - weight).reshape(-1), q.NF4_BLOCKSIZE).abs()
    assert torch.all(error <= bound)
    # every block's largest entry is exact up to its sign (±1 is in the codebook)
    torch.testing.assert_close(q._blocks(restored.reshape(-1), 64).abs().amax(1), absmax, rtol=1e-12, atol=0)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 150), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_int8_error_is_within_half_a_step_of_each_row(rows, cols, scale, seed):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    codes, scales = q.quantize_int8_rows(weight)
    assert codes.dtype == torch.int8 and scales.shape == (rows,)
    error = (q.dequantize_int8_rows(codes, scales) - weight).abs()
    assert torch.all(error <= scales[:, None] / 2 * (1 + 1e-12))


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 2000), seed=st.integers(0, 2**16))
def test_double_quantized_constants_are_within_half_a_step_of_their_block(count, seed):
    constants = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    codes, scales, offset = q.quantize_constants(constants)
    assert codes.dtype == torch.int8 and scales.shape == (-(-count // q.ABSMAX_BLOCKSIZE),)
    error = (q.dequantize_constants(codes, scales, offset) - constants).abs()
    step = scales.repeat_interleave(q.ABSMAX_BLOCKSIZE)[:count]
    assert torch.all(error <= step / 2 * (1 + 1e-9) + 1e-15)


@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=301))
def test_two_codes_per_byte_round_trip(codes):
    tensor = torch.tensor(codes, dtype=torch.uint8)
    packed = q.pack_nibbles(tensor)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(q.unpack_nibbles(packed, len(codes)), tensor)
    assert int(packed[0]) >> 4 == codes[0]  # the first code of a pair sits in the high nibble


def test_a_block_of_zeros_stays_zero_and_requantizing_a_dequantized_weight_is_a_fixed_point():
    weight = torch.randn(4, 96, dtype=torch.float64)
    weight[0] = 0.0  # the first block (64 entries of row 0) is all zero
    packed, absmax = q.quantize_nf4(weight)
    restored = q.dequantize_nf4(packed, absmax, weight.shape)
    assert torch.all(restored[0, :64] == 0)
    again = q.dequantize_nf4(*q.quantize_nf4(restored), weight.shape)
    torch.testing.assert_close(again, restored, rtol=1e-12, atol=0)

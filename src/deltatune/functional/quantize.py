"""Weight quantization math for a frozen base: 8-bit per-row absmax and QLoRA's 4-bit NormalFloat (NF4).

Pure tensor functions (tensors in, tensors out); the module that stores a quantized Linear and dequantizes it on
the fly is `core.quantized.QuantizedLinear`.

- **int8, per output row** (`quantize_int8_rows`): each row r of W gets one scale s_r = max|W_r| / 127 and codes
  round(W_r / s_r) in [-127, 127]. This is LLM.int8()'s vector-wise quantization (Dettmers et al., 2022,
  arXiv:2208.07339, §3.2) of the weight side only, *without* its mixed-precision outlier decomposition (the
  activation columns above the 6.0 threshold run in 16-bit there); here activations are never quantized, so
  there is no activation outlier to decompose.
- **NF4** (`nf4_codebook`, `quantize_nf4`): QLoRA (Dettmers et al., 2023, arXiv:2305.14314, §3): the weight is
  cut into blocks of 64 consecutive entries (row-major), each block divided by its absmax into [-1, 1] and every
  entry replaced by the nearest of 16 NormalFloat values; two 4-bit codes are packed per uint8 (the first of a
  pair in the high nibble). Double quantization (§3, "Double Quantization") quantizes the float32 absmax
  constants again, in blocks of 256 after subtracting their mean. Deviation: the paper's second level uses an
  8-bit *float* format; here it is 8-bit symmetric linear absmax (int8 codes, one float32 scale per 256
  constants). The memory is the same (8 bits per constant + 32 / 256 bits), the error of the constants differs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

NF4_BLOCKSIZE = 64  # QLoRA §3: blocksize 64 for W
ABSMAX_BLOCKSIZE = 256  # QLoRA §3, Double Quantization: blocksize 256 for the constants
_INT8_MAX = 127
_TINY = torch.finfo(torch.float32).tiny  # a block of zeros divides by this and stays zero


def nf4_codebook(dtype: torch.dtype = torch.float32) -> Tensor:
    """The 16 values of the 4-bit NormalFloat data type, ascending, in [-1, 1] with an exact 0.

    QLoRA §3 (Eq. 4): a k-bit quantile data type takes the quantiles of N(0, 1) at equally spaced probabilities
    and normalizes them into [-1, 1]. For an exact zero it is built asymmetrically: 2^(k-1) quantiles for the
    positive half (8 values, from the 0.5 quantile up, the 0.5 one dropped: it is the zero) and 2^(k-1) - 1 for
    the negative half (7 values), the two halves joined with one 0. The 0 and 1 quantiles are infinite, so the
    probability grid stops at δ = ½((1 − 1/(2·15)) + (1 − 1/(2·16))), the mean of the outermost midpoints of 15-
    and 16-cell grids (the value the reference implementation, bitsandbytes' `create_normal_map`, uses).
    Computed in float64 with the inverse normal CDF (`torch.special.ndtri`), then cast to `dtype`.
    """
    delta = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    values = values / values.abs().max()  # both ends are ±ndtri(δ): exactly -1 and 1 after this
    return values.sort().values.to(dtype)


def nf4_max_half_gap() -> float:
    """Half the widest gap between neighbouring NF4 values: the worst rounding error of a normalized entry."""
    codebook = nf4_codebook(torch.float64)
    return float((codebook[1:] - codebook[:-1]).max()) / 2


# --- packing ---------------------------------------------------------------------------------------------------
def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes < 16 (any shape, read flat) -> uint8 of ceil(n / 2) bytes, two codes per byte: the even-
    indexed code in the high nibble. An odd count is padded with one zero code."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: Tensor, count: int) -> Tensor:
    """Inverse of `pack_nibbles`: the first `count` codes, flat uint8."""
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)
    return codes[:count]


# --- int8, per output row ----------------------------------------------------------------------------------------
def quantize_int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(codes int8 (out, in), scales (out,)): W ≈ codes · scales[:, None]. A row of zeros gets scale 0. The
    scales are float32 (float64 for a float64 weight: exact references in tests)."""
    matrix = weight.detach().reshape(weight.shape[0], -1).to(_work_dtype(weight))
    scales = matrix.abs().amax(dim=1) / _INT8_MAX
    codes = torch.round(matrix / scales.clamp_min(_TINY)[:, None]).clamp(-_INT8_MAX, _INT8_MAX)
    return codes.to(torch.int8), scales


def dequantize_int8_rows(codes: Tensor, scales: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """codes · scales[:, None] in `dtype` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    return codes.to(dtype) * scales.to(dtype)[:, None]


# --- NF4 ---------------------------------------------------------------------------------------------------------
def quantize_nf4(weight: Tensor, blocksize: int = NF4_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """(packed uint8 (ceil(n / 2),), absmax (n_blocks,), float32 or float64 as for int8) of W read flat in
    blocks of `blocksize`; the last block is padded with zeros. Each entry gets the NF4 value nearest to
    entry / absmax of its block."""
    blocks = _blocks(weight.detach().reshape(-1).to(_work_dtype(weight)), blocksize)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp_min(_TINY)[:, None]
    codebook = nf4_codebook(normalized.dtype)
    # nearest value by the midpoints between neighbours (one searchsorted, not a 16-way distance table)
    codes = torch.bucketize(normalized, (codebook[1:] + codebook[:-1]) / 2)
    return pack_nibbles(codes.reshape(-1)[: weight.numel()]), absmax


def dequantize_nf4(
    packed: Tensor, absmax: Tensor, shape: tuple[int, ...], blocksize: int = NF4_BLOCKSIZE,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The weight of `shape` from its packed NF4 codes and per-block absmax, in `dtype` (default absmax's)."""
    dtype = dtype or absmax.dtype
    count = math.prod(shape)
    values = nf4_codebook(dtype).to(packed.device)[unpack_nibbles(packed, count).long()]
    values = _blocks(values, blocksize) * absmax.to(dtype)[:, None]
    return values.reshape(-1)[:count].reshape(shape)


# --- double quantization of the constants -------------------------------------------------------------------
def quantize_constants(constants: Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[Tensor, Tensor, Tensor]:
    """(codes int8 (n,), scales (n_blocks,), offset ()): c ≈ codes · scale_of_block + offset, the scales and
    offset in the constants' dtype (float32, or float64).

    QLoRA §3: the mean of the constants is subtracted first (they are all positive; centring them lets a
    symmetric quantizer use its whole range), then blocks of `blocksize` are absmax-quantized to 8 bits."""
    constants = constants.detach().to(_work_dtype(constants))
    offset = constants.mean()
    blocks = _blocks(constants - offset, blocksize)
    scales = blocks.abs().amax(dim=1) / _INT8_MAX
    codes = torch.round(blocks / scales.clamp_min(_TINY)[:, None]).clamp(-_INT8_MAX, _INT8_MAX)
    return codes.reshape(-1)[: constants.numel()].to(torch.int8), scales, offset


def dequantize_constants(
    codes: Tensor, scales: Tensor, offset: Tensor, blocksize: int = ABSMAX_BLOCKSIZE, dtype: torch.dtype | None = None,
) -> Tensor:
    """Inverse of `quantize_constants` (up to its rounding), in `dtype` (default the scales')."""
    dtype = dtype or scales.dtype
    values = _blocks(codes.to(dtype), blocksize) * scales.to(dtype)[:, None]
    return values.reshape(-1)[: codes.numel()] + offset.to(dtype)


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """A flat tensor as (n_blocks, blocksize) rows, the last padded with zeros."""
    padding = (-flat.numel()) % blocksize
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.reshape(-1, blocksize)


def _work_dtype(weight: Tensor) -> torch.dtype:
    """float64 weights are quantized in float64 (exact references in tests), every other dtype in float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32

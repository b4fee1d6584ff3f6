"""Weight sketches: b-bit codes packed into bytes, per-(row, group) value tables, and the 1-D k-means that builds
them. Pure tensor math (no modules); `methods/sketchtune.py` sits on top.

A sketch of a matrix W (out × in) with g groups per row and b bits:

    columns split into g contiguous groups (sizes differ by at most one when g does not divide in)
    codes  c ∈ {0, …, 2^b − 1}^{out × in}
    table  V ∈ R^{out × g × 2^b}
    Ŵ[i, j] = V[i, group(j), c[i, j]]

Packing: every 8 codes become b bytes (a little-endian bit stream, code k at bits b·k … b·k + b − 1 of its
8-code word), so the codes take exactly b/8 byte per weight (plus at most 7 codes of padding per matrix); 8-bit
codes are the bytes themselves. Everything here is vectorized over all rows and groups: no Python loop over rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
_CODES_PER_WORD = 8  # 8 codes of b bits fill exactly b bytes


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take once packed."""
    if bits == 8:
        return count
    return -(-count // _CODES_PER_WORD) * bits


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes (any shape, integers in [0, 2^bits)) -> a flat uint8 tensor of `packed_size(codes.numel(), bits)`."""
    flat = codes.reshape(-1).long()
    if bits == 8:
        return flat.to(torch.uint8)
    padding = (-flat.numel()) % _CODES_PER_WORD
    words = torch.nn.functional.pad(flat, (0, padding)).reshape(-1, _CODES_PER_WORD)
    code_shifts = torch.arange(_CODES_PER_WORD, device=codes.device) * bits
    word = (words << code_shifts).sum(dim=1)  # at most 7 · 8 = 56 bits: fits in int64
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of `pack_codes`: the first `count` codes, as a flat int64 tensor."""
    if bits == 8:
        return packed[:count].long()
    octets = packed.reshape(-1, bits).long()
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (octets << byte_shifts).sum(dim=1)
    code_shifts = torch.arange(_CODES_PER_WORD, device=packed.device) * bits
    codes = (word[:, None] >> code_shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]


def group_sizes(columns: int, groups: int) -> list[int]:
    """Sizes of the `groups` contiguous column groups of a row: the first `columns % groups` take one more."""
    base, extra = divmod(columns, groups)
    return [base + (1 if k < extra else 0) for k in range(groups)]


def column_groups(columns: int, groups: int, device: torch.device | None = None) -> Tensor:
    """group(j) for every column j (int64, length `columns`)."""
    sizes = torch.tensor(group_sizes(columns, groups), device=device)
    return torch.repeat_interleave(torch.arange(groups, device=device), sizes)


def reconstruct(table: Tensor, codes: Tensor, groups_of_columns: Tensor) -> Tensor:
    """Ŵ (out × in) from the table (out × g × K) and the unpacked codes (out × in). One gather; its backward is
    the paper's scatter-add of ∂L/∂Ŵ into the table."""
    out, groups, levels = table.shape
    index = codes + groups_of_columns * levels
    return table.reshape(out, groups * levels).gather(1, index)


# --- building a sketch: per-(row, group) 1-D k-means ------------------------------------------------------------
def grouped_view(matrix: Tensor, weights: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values, weights, positions): `matrix` (out × in) as out·g rows of the longest group's length, padded with
    weight 0; `weights` (in,) are per-column; positions (g × n) index the columns (pads repeat the last one)."""
    out, columns = matrix.shape
    sizes = torch.tensor(group_sizes(columns, groups), device=matrix.device)
    starts = torch.cumsum(sizes, 0) - sizes
    longest = int(sizes.max())
    offsets = torch.arange(longest, device=matrix.device)
    valid = offsets[None, :] < sizes[:, None]  # (g, n)
    positions = starts[:, None] + torch.minimum(offsets[None, :], sizes[:, None] - 1)
    values = matrix[:, positions].reshape(out * groups, longest)
    column_weights = (weights[positions] * valid).expand(out, groups, longest).reshape(out * groups, longest)
    return values, column_weights, positions


def quantile_centroids(values: Tensor, weights: Tensor, levels: int) -> Tensor:
    """Deterministic start: the (k + ½)/K quantiles of each row's entries of positive weight, sorted (rows × K)."""
    present = weights > 0
    masked = torch.where(present, values, torch.full_like(values, float("inf")))
    ordered, _ = masked.sort(dim=1)
    counts = present.sum(dim=1, keepdim=True).clamp(min=1)
    ranks = (torch.arange(levels, device=values.device, dtype=values.dtype) + 0.5) / levels
    index = (ranks[None, :] * counts).long().clamp(max=values.shape[1] - 1)
    index = torch.minimum(index, counts - 1)
    centroids = ordered.gather(1, index)
    # a row without any weight (a group of columns no input ever reaches) keeps its plain quantiles
    plain = values.sort(dim=1).values.gather(1, (ranks[None, :] * values.shape[1]).long().expand_as(index))
    return torch.where(torch.isfinite(centroids), centroids, plain)


def nearest_codes(values: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of each entry (rows × n), centroids sorted per row: a binary search on the
    midpoints, never an n × K distance table."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def weighted_error(values: Tensor, weights: Tensor, centroids: Tensor, codes: Tensor) -> Tensor:
    """Σ w (x − c[code])² over everything."""
    return (weights * (values - centroids.gather(1, codes)).square()).sum()


def lloyd_step(values: Tensor, weights: Tensor, centroids: Tensor, codes: Tensor) -> Tensor:
    """New centroids: each the weighted mean of its entries (an empty cluster keeps its centroid), sorted."""
    sums = torch.zeros_like(centroids).scatter_add_(1, codes, weights * values)
    mass = torch.zeros_like(centroids).scatter_add_(1, codes, weights)
    moved = torch.where(mass > 0, sums / mass.clamp(min=torch.finfo(mass.dtype).tiny), centroids)
    return moved.sort(dim=1).values


def kmeans_1d(values: Tensor, weights: Tensor, levels: int, iterations: int) -> tuple[Tensor, Tensor, list[float]]:
    """Weighted 1-D k-means on every row at once: (centroids rows × K, codes rows × n, errors), errors[t] the
    weighted squared error after t Lloyd iterations (non-increasing). The codes are the nearest centroids."""
    centroids = quantile_centroids(values, weights, levels)
    codes = nearest_codes(values, centroids)
    errors = [float(weighted_error(values, weights, centroids, codes))]
    for _ in range(iterations):
        centroids = lloyd_step(values, weights, centroids, codes)
        codes = nearest_codes(values, centroids)
        errors.append(float(weighted_error(values, weights, centroids, codes)))
    return centroids, codes, errors


def sketch_matrix(matrix: Tensor, groups: int, bits: int, iterations: int,
                  column_weights: Tensor | None = None) -> tuple[Tensor, Tensor, list[float]]:
    """(table out × g × 2^bits, codes out × in int64, errors) of `matrix` by per-(row, group) k-means, in
    float64; `column_weights` (in,) weight each column's squared error (None: all 1)."""
    matrix = matrix.double()
    out, columns = matrix.shape
    weights = torch.ones(columns, dtype=matrix.dtype, device=matrix.device) if column_weights is None \
        else column_weights.to(matrix)
    values, grouped_weights, positions = grouped_view(matrix, weights, groups)
    centroids, grouped_codes, errors = kmeans_1d(values, grouped_weights, 1 << bits, iterations)
    codes = torch.zeros(out, columns, dtype=torch.long, device=matrix.device)
    codes[:, positions] = grouped_codes.reshape(out, groups, -1)  # pads repeat a column with its own code
    return centroids.reshape(out, groups, 1 << bits), codes, errors

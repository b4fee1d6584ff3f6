"""Tensor-ring (TR) and tensor-ring-matrix (TRM) contractions, and the factorization of a size into modes.

Index order everywhere: row-major over the modes (the first mode is the most significant digit of a flat index),
which is the order of `torch.kron` and of a `reshape` of the flat dimension into the mode sizes.

- TR tensor: cores ``G_k`` of shape (n_k, R, R); entry ``X[k_1, ..., k_K] = tr(G_1[k_1] ⋯ G_K[k_K])``.
- TRM matrix: cores ``A_d`` of shape (I_d, J_d, R, R); entry ``T[ī, j̄] = tr(A_1[i_1, j_1] ⋯ A_D[i_D, j_D])``
  with ī = (i_1, ..., i_D) and j̄ = (j_1, ..., j_D). With R = 1 it is the Kronecker product of the D matrices.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _closed_ring(chain: Tensor) -> Tensor:
    """tr over the two trailing ring indices of (..., R, R)."""
    return chain.diagonal(dim1=-2, dim2=-1).sum(-1)


def ring_tensor(cores: Sequence[Tensor]) -> Tensor:
    """The TR tensor of `cores` ((n_k, R, R) each), flattened to a vector of Π n_k entries."""
    chain = cores[0]
    for core in cores[1:]:
        chain = torch.einsum("pab,ibc->piac", chain, core).reshape(-1, core.shape[-1], core.shape[-1])
    return _closed_ring(chain)


def ring_matrix(cores: Sequence[Tensor]) -> Tensor:
    """The dense TRM matrix (Π I_d, Π J_d) of `cores` ((I_d, J_d, R, R) each)."""
    chain = cores[0]
    for core in cores[1:]:
        rows, cols = chain.shape[0] * core.shape[0], chain.shape[1] * core.shape[1]
        chain = torch.einsum("pqab,ijbc->piqjac", chain, core).reshape(rows, cols, *core.shape[-2:])
    return _closed_ring(chain)


def times_ring_matrix(matrix: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """``matrix @ T`` for the TRM matrix T of `cores`, without forming T.

    One mode at a time: the columns of `matrix` (M, Π I_d) are read as the modes (I_1, ..., I_D); core d replaces
    mode I_d by J_d and carries the ring index, and the ring is closed at the end. Cost O(M · in · Σ_d I_d · R³)
    instead of the dense O(M · in²) (plus forming T)."""
    rows = matrix.shape[0]
    first = cores[0]
    state = torch.einsum("mis,ijac->macjs", matrix.reshape(rows, first.shape[0], -1), first)
    for core in cores[1:]:
        _, ring, _, done, rest = state.shape
        modes, cols = core.shape[0], core.shape[1]
        state = state.reshape(rows, ring, ring, done, modes, rest // modes)
        state = torch.einsum("macdis,ijce->maedjs", state, core)
        state = state.reshape(rows, ring, core.shape[-1], done * cols, rest // modes)
    return state.diagonal(dim1=1, dim2=2).sum(-1).reshape(rows, -1)


def identity_ring_cores(sizes: Sequence[int], rank: int, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """TRM cores with every slice ``A_d[:, :, r, r'] = I / R``, whose matrix is exactly the identity: a product of
    D all-(1/R) R×R matrices is (1/R)·11ᵀ, whose trace is 1."""
    cores = []
    for size in sizes:
        eye = torch.eye(size, dtype=dtype) / rank
        cores.append(eye[:, :, None, None].expand(size, size, rank, rank).clone())
    return cores


def balanced_modes(size: int, count: int) -> tuple[int, ...] | None:
    """`size` as `count` factors, each >= 2, with the smallest sum of squares (which sets a TRM transform's core
    size, Σ I_d² R²), ascending; None when `size` has fewer than `count` prime factors."""
    best: tuple[int, ...] | None = None
    for option in _factorizations(size, count, 2):
        if best is None or sum(f * f for f in option) < sum(f * f for f in best):
            best = option
    return best


def _factorizations(size: int, count: int, smallest: int):
    """Every ascending tuple of `count` factors >= `smallest` whose product is `size`."""
    if count == 1:
        if size >= smallest:
            yield (size,)
        return
    for factor in range(smallest, math.isqrt(size) + 1):
        if size % factor == 0:
            for rest in _factorizations(size // factor, count - 1, factor):
                yield (factor, *rest)

"""Sparse weight updates: a vector of values at fixed positions of a (out, fan_in) matrix.

Positions are flat, row-major indices into the matrix view of `core.layers` (``row * fan_in + col``), sorted and
unique, so they are also the CSR order of the update S. Two ways to use S:

- `scatter_matrix` builds the dense S (merging, regularizers, and the denser path for convolutions/embeddings);
- `sparse_matmul(x, values, pattern)` computes ``x @ Sᵀ`` without ever forming a dense (out, fan_in) tensor, in
  forward or backward: ``grad_x = grad_out @ S`` is a sparse-dense product and
  ``grad_values[k] = Σ_n grad_out[n, row_k] · x[n, col_k]`` is a sampled dense-dense product (SDDMM) evaluated only
  at the k positions. Optimizer state then exists only for the values (SaRA's "unstructural backpropagation",
  SPT's sparse-gradient linear).
- `sparse_adapted_linear(x, W, b, values, pattern)` computes the whole layer ``x (W + S)ᵀ + b`` as one autograd
  node: W + S is formed as a transient copy of the weight in forward and again in backward (never kept), so the
  layer costs the dense layer's two GEMMs plus the SDDMM, and still no dense gradient is formed for W or S.

Float32/float64 use torch's CSR kernels (`torch.sparse.mm`, `torch.sparse.sampled_addmm`). Other dtypes (half,
bfloat16: no CPU sparse kernels) fall back to a dense S of the weight's size, and the value gradient is gathered
from row blocks of ``grad_outᵀ x`` bounded by `CHUNK_ELEMENTS`, so no full dense gradient is formed there either.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

# Largest dense block (in elements) the fallback gradient forms at once: 4M floats = 16 MB in float32.
CHUNK_ELEMENTS = 1 << 22
_CSR_DTYPES = (torch.float32, torch.float64)


def rows_and_columns(indices: Tensor, fan_in: int) -> tuple[Tensor, Tensor]:
    """(row, column) of each flat position in a (out, fan_in) matrix."""
    return torch.div(indices, fan_in, rounding_mode="floor"), torch.remainder(indices, fan_in)


def scatter_matrix(values: Tensor, indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The dense (out, fan_in) matrix holding `values` at `indices` and zeros elsewhere (differentiable)."""
    flat = values.new_zeros(shape[0] * shape[1])
    return flat.index_put((indices,), values).view(shape)


def gather_matrix(matrix: Tensor, indices: Tensor) -> Tensor:
    """The entries of a (out, fan_in) matrix at flat `indices`."""
    return matrix.reshape(-1).index_select(0, indices)


class SparsePattern:
    """The CSR structure of S (out, fan_in), derived once from the sorted flat positions; that of Sᵀ is built on
    first use (only the unfused path's input gradient needs it). Row pointers and columns are int32 when the
    sizes allow (torch's CSR kernels take either), to keep the cache small next to the values."""

    def __init__(self, indices: Tensor, shape: tuple[int, int]) -> None:
        out, fan_in = shape
        self.shape = shape
        self.indices = indices
        self.index_dtype = torch.int32 if max(out, fan_in, indices.numel()) < 2**31 - 1 else torch.int64
        rows, cols = rows_and_columns(indices, fan_in)
        self.crow = _compressed(rows, out).to(self.index_dtype)
        self.col = cols.to(self.index_dtype)
        self._transpose: tuple[Tensor, Tensor, Tensor] | None = None

    @staticmethod
    def from_indices(indices: Tensor, shape: tuple[int, int]) -> SparsePattern:
        return SparsePattern(indices, shape)

    def transpose_parts(self) -> tuple[Tensor, Tensor, Tensor]:
        """(row pointers, columns, order): `order[j]` is the value index of the j-th entry of Sᵀ in CSR order."""
        if self._transpose is None:
            out, fan_in = self.shape
            rows, cols = rows_and_columns(self.indices, fan_in)
            order = torch.argsort(cols * out + rows)
            self._transpose = (_compressed(cols, fan_in).to(self.index_dtype),
                               rows.index_select(0, order).to(self.index_dtype), order)
        return self._transpose

    def cached_tensors(self) -> list[Tensor]:
        """Every tensor this cache holds besides the positions (for memory accounting)."""
        return [self.crow, self.col, *(self._transpose or ())]

    def matrix(self, values: Tensor) -> Tensor:
        """S as a CSR tensor."""
        return _csr(self.crow, self.col, values, self.shape)

    def transposed(self, values: Tensor) -> Tensor:
        """Sᵀ as a CSR tensor."""
        crow, col, order = self.transpose_parts()
        return _csr(crow, col, values.index_select(0, order), self.shape[::-1])


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch warns once that CSR tensors are "beta"; our tests cover the ops used
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _compressed(sorted_major: Tensor, size: int) -> Tensor:
    """CSR row pointers from the (sorted) major index of each entry."""
    counts = torch.bincount(sorted_major, minlength=size)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class PatternCache:
    """Rebuilds the `SparsePattern` only when the positions tensor changes (new storage, device, or in-place
    write such as loading a file, tracked by the tensor's version counter)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._pattern: SparsePattern | None = None

    def get(self, indices: Tensor, shape: tuple[int, int]) -> SparsePattern:
        key = (indices.data_ptr(), indices._version, indices.device, indices.numel(), shape)
        if key != self._key or self._pattern is None:
            self._pattern = SparsePattern.from_indices(indices, shape)
            self._key = key
        return self._pattern


def sparse_matmul(x: Tensor, values: Tensor, pattern: SparsePattern) -> Tensor:
    """``x @ Sᵀ`` for x of shape (..., fan_in); the result has shape (..., out) and x's dtype."""
    flat = x.reshape(-1, pattern.shape[1]).to(values.dtype)
    y = _SparseMatmul.apply(flat, values, pattern)
    return y.reshape(*x.shape[:-1], pattern.shape[0]).to(x.dtype)


class _SparseMatmul(torch.autograd.Function):
    """y = x Sᵀ; backward: grad_x = grad_y S, grad_values = SDDMM(grad_yᵀ, x) at the positions."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(x, values)
        if values.dtype in _CSR_DTYPES:
            return torch.sparse.mm(pattern.matrix(values), x.T).T
        return x @ scatter_matrix(values, pattern.indices, pattern.shape).T

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad_y, values, pattern)
        if ctx.needs_input_grad[1]:
            grad_values = sampled_products(grad_y, x, values, pattern)
        return grad_x, grad_values, None


def _grad_input(grad_y: Tensor, values: Tensor, pattern: SparsePattern) -> Tensor:
    if values.dtype in _CSR_DTYPES:
        # (Sᵀ grad_yᵀ)ᵀ: CSR times dense is the fast direction of torch's CPU kernels
        return torch.sparse.mm(pattern.transposed(values), grad_y.T).T
    return grad_y @ scatter_matrix(values, pattern.indices, pattern.shape)


def sampled_products(grad_y: Tensor, x: Tensor, values: Tensor, pattern: SparsePattern) -> Tensor:
    """``(grad_yᵀ x)`` evaluated only at the pattern's positions, in value order (an SDDMM).

    grad_y is (N, out), x is (N, fan_in). No (out, fan_in) tensor is formed: torch's sampled_addmm computes one
    dot product per position; the fallback forms row blocks of at most `CHUNK_ELEMENTS` entries.
    """
    if values.dtype in _CSR_DTYPES:
        template = pattern.matrix(torch.zeros_like(values))
        return torch.sparse.sampled_addmm(template, grad_y.T, x, beta=0.0).values()
    return _row_block_products(grad_y, x, pattern)


def _row_block_products(grad_y: Tensor, x: Tensor, pattern: SparsePattern) -> Tensor:
    out, fan_in = pattern.shape
    block = max(1, CHUNK_ELEMENTS // max(fan_in, 1))
    result = x.new_empty(pattern.indices.numel())
    crow = pattern.crow.tolist()
    for start in range(0, out, block):
        stop = min(start + block, out)
        first, last = crow[start], crow[stop]
        if first == last:
            continue
        products = grad_y[:, start:stop].T @ x
        result[first:last] = products.reshape(-1).index_select(0, pattern.indices[first:last] - start * fan_in)
    return result


def sparse_adapted_linear(x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor,
                          pattern: SparsePattern) -> Tensor:
    """``x (W + S)ᵀ + b`` for x (..., fan_in), W the (out, fan_in) matrix (a transposed view is fine)."""
    flat = x.reshape(-1, pattern.shape[1]).to(weight.dtype)
    y = _SparseAdaptedLinear.apply(flat, weight, bias, values, pattern)
    return y.reshape(*x.shape[:-1], pattern.shape[0]).to(x.dtype)


def _adapted_matrix(weight: Tensor, values: Tensor, pattern: SparsePattern) -> Tensor:
    """W + S as a new dense (out, fan_in) tensor (W itself is not modified)."""
    return weight.reshape(-1).index_add(0, pattern.indices, values.to(weight.dtype)).view(pattern.shape)


class _SparseAdaptedLinear(torch.autograd.Function):
    """y = x (W + S)ᵀ + b; backward: grad_x = grad_y (W + S), grad_values = SDDMM at the positions, grad_b = Σ grad_y.
    W gets a (dense) gradient only if it requires one itself (a trainable base weight)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(x, weight, values)
        return torch.nn.functional.linear(x, _adapted_matrix(weight, values, pattern), bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need_x, need_weight, need_bias, need_values = ctx.needs_input_grad[:4]
        grad_x = grad_y @ _adapted_matrix(weight, values, pattern) if need_x else None
        grad_weight = grad_y.T @ x if need_weight else None
        grad_bias = grad_y.sum(0) if need_bias else None
        grad_values = sampled_products(grad_y, x, values, pattern).to(values.dtype) if need_values else None
        return grad_x, grad_weight, grad_bias, grad_values, None

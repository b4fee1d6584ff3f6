"""The tensor math of LyCORIS's Hadamard (LoHa) and Kronecker (LoKr) updates, as peft 0.21 and LyCORIS compute it.

Pure functions: tensors in, tensors out. The method files (`methods.loha`, `methods.lokr`) own the parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor


def tucker_rebuild(core: Tensor, out_factor: Tensor, in_factor: Tensor, *, in_factor_first: bool = False) -> Tensor:
    """(out, in, k1, k2) from a Tucker core (r, r, k1, k2) and mode factors out_factor (r, out), in_factor (r, in):
    W[p, q, k, l] = Σ_ij core[i, j, k, l] out_factor[i, p] in_factor[j, q] (LyCORIS's "effective conv2d").

    peft's LoHa contracts the in factor first, its LoKr the out factor: `in_factor_first` follows the former, so
    each method rounds as peft does (the values agree to float precision either way)."""
    if in_factor_first:
        return torch.einsum("i j k l, j r, i p -> p r k l", core, in_factor, out_factor)
    return torch.einsum("i j k l, i p, j r -> p r k l", core, out_factor, in_factor)


def hadamard_of_products(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> Tensor:
    """(B₁ A₁) ⊙ (B₂ A₂): LoHa's update before scaling."""
    return (first[0] @ first[1]) * (second[0] @ second[1])


def kronecker(left: Tensor, right: Tensor) -> Tensor:
    """left ⊗ right; a 2-D `left` with a 4-D `right` (a conv kernel block) acts on the channel dimensions only."""
    if right.dim() == 4 and left.dim() == 2:
        left = left[:, :, None, None]
    # A Tucker rebuild of a Conv1d block, (b, d, k, 1), can come out of einsum with an odd stride on its size-1
    # dimension, which torch.kron cannot view (peft 0.21 fails there); a fresh contiguous copy always works.
    return torch.kron(left, right.clone(memory_format=torch.contiguous_format))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """dimension = m · n with m <= n: m = `factor` when it divides `dimension`; otherwise the divisor pair closest
    to √dimension whose first side, walked up from 1, does not exceed `factor` (-1: no bound). LyCORIS's rule,
    which peft follows: (256, -1) -> (16, 16), (128, -1) -> (8, 16), (127, -1) -> (1, 127), (128, 4) -> (4, 32).
    (Their loop also stops when a pair's sum exceeds 1 + dimension, which no divisor pair does.)"""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > bound:
            break
        m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


def output_row_dropout(weight: Tensor, rate: float, rescale: bool) -> Tensor:
    """LyCORIS's "rank dropout": zero whole output rows of ΔW with probability `rate` (drawn from torch's global
    CPU generator, as peft draws it), then with `rescale` divide by the kept share. If every row is dropped the
    update is zero (peft would divide by 0)."""
    keep = (torch.rand(weight.shape[0]) > rate).to(weight.dtype)
    if rescale and bool(keep.any()):
        keep = keep / keep.mean()
    return weight * keep.view(-1, *([1] * (weight.dim() - 1))).to(weight.device)

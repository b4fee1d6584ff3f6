"""The LyCORIS tensor math: LoKr's factor split is peft's (every dimension and factor tried), the Tucker rebuild
is the mode product it claims, and the Kronecker product of a Conv1d Tucker block works where torch.kron's view
of einsum's output fails."""
from __future__ import annotations

import pytest
import torch

from deltatune.functional.lycoris import factorization, kronecker, tucker_rebuild

peft_lokr = pytest.importorskip("peft.tuners.lokr.layer")


def test_factorization_is_peft_s_for_every_dimension_and_factor():
    for dimension in range(1, 600):
        for factor in (-1, 1, 2, 3, 4, 7, 8, 16):
            assert factorization(dimension, factor) == peft_lokr.factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("in_factor_first", [False, True])
def test_tucker_rebuild_is_the_mode_product(in_factor_first):
    generator = torch.Generator().manual_seed(0)
    core, up, down = (torch.randn(s, generator=generator, dtype=torch.float64) for s in ((2, 3, 3, 1), (2, 5), (3, 4)))
    expected = torch.zeros(5, 4, 3, 1, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            expected += core[i, j] * (up[i][:, None] * down[j][None, :])[:, :, None, None]
    torch.testing.assert_close(tucker_rebuild(core, up, down, in_factor_first=in_factor_first), expected,
                               rtol=1e-13, atol=1e-13)


def test_kronecker_of_a_conv1d_tucker_block():
    block = tucker_rebuild(torch.randn(1, 1, 3, 1), torch.randn(1, 4), torch.randn(1, 2))
    left = torch.randn(2, 2)
    result = kronecker(left, block)
    assert result.shape == (8, 4, 3, 1)
    torch.testing.assert_close(result[4:, 2:], left[1, 1] * block)

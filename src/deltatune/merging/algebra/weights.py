"""Checks on model weights that several merge methods share."""
from __future__ import annotations

from collections.abc import Sequence

from deltatune.errors import MergeError


def require_nonzero_sum(weights: Sequence[float]) -> None:
    """`normalize: true` divides by Σ w_i: refuse weights that cancel out."""
    if abs(sum(weights)) < 1e-8:
        raise MergeError(f"weights {list(weights)} sum to 0 but normalize: true divides by their sum; "
                         "change a weight or set normalize: false")


def require_unit_sum(weights: Sequence[float], tolerance: float = 1e-6) -> None:
    """An unnormalized model soup must be an affine combination: Σ w_i = 1."""
    if abs(sum(weights) - 1.0) > tolerance:
        raise MergeError(f"weights {list(weights)} sum to {sum(weights):g}, but linear with normalize: false "
                         "needs them to sum to 1; fix the weights or set normalize: true")

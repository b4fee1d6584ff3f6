"""What every search in `deltatune.merging.search` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SearchResult:
    """Best value found (a number, or a list of coefficients), its score, and every (value, score) evaluated,
    in order."""

    best: Any
    score: float
    history: list[tuple[Any, float]] = field(default_factory=list)

"""LyCORIS's LoHa and LoKr in kohya files (``<prefix><module>.hada_w1_a`` ..., ``.lokr_w1`` ..., ``.alpha``): two
rows of the kohya format's `KINDS` table (`deltatune.core.kohya_format`), mapped to deltatune's `loha` and
`lokr` methods, whose tensors already carry LyCORIS's names and layouts (`methods.loha`, `methods.lokr`).

What a file means (LyCORIS ``modules/loha.py`` / ``modules/lokr.py``, read by sd-webui and ComfyUI alike):

- LoHa: ΔW = (alpha / r) · (w1_a w1_b) ⊙ (w2_a w2_b), r = hada_w1_b's first dimension; ``hada_t1`` / ``hada_t2``
  mark the Tucker form of convolutions (deltatune's ``effective_conv2d``).
- LoKr: ΔW = scale · W₁ ⊗ W₂; each factor full (``lokr_w1``, ``lokr_w2``) or low rank (``_a`` ``_b``; ``lokr_t2``
  for the Tucker form of W₂). scale = alpha / r, r the low-rank factors' inner dimension — except a module whose
  two factors are both full, which LyCORIS runs at scale 1 (it stores alpha = r there).
- a missing or zero alpha is alpha = r.

The load rebuilds deltatune's config from the shapes: the rank (one for the file), ``decompose_both`` (W₁ low
rank somewhere), the Tucker form, and the ``decompose_factor`` that reproduces every module's Kronecker split
(tried: -1, then each module's first-factor size, as LyCORIS's own loader does). A file deltatune cannot
reproduce exactly — ranks or alphas that differ between modules, LoKr modules with full factors beside low-rank
ones at a scale other than 1, LyCORIS's ``unbalanced_factorization`` — is refused by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from deltatune.core.foreign_format import one_value
from deltatune.core.kohya_format import KohyaKind, register_kind, saved_alpha
from deltatune.errors import AdapterFileError, DeltatuneError
from deltatune.functional.lycoris import factorization

LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
Modules = dict[str, dict[str, Tensor]]


def _loha_fields(modules: Modules, shapes: dict[str, tuple[int, ...]], source: Path) -> dict[str, Any]:
    ranks = {name: int(group["hada_w1_b"].shape[0]) for name, group in modules.items() if "hada_w1_b" in group}
    if len(ranks) < len(modules):
        missing = next(name for name in modules if name not in ranks)
        raise AdapterFileError(f"{source}: LoHa module {missing!r} has no hada_w1_b; the file is incomplete")
    rank = int(one_value(ranks, "the rank", source, "split the file into one adapter per rank"))
    alpha = one_value({name: saved_alpha(group, rank) for name, group in modules.items()}, "alpha", source,
                      "split the file into one adapter per alpha")
    return {"r": rank, "alpha": alpha, "use_effective_conv2d": any("hada_t1" in g for g in modules.values())}


def _lokr_rank(group: dict[str, Tensor]) -> int | None:
    """A LoKr module's rank: the inner dimension of its low-rank factors; None when both factors are full."""
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in group:
            return int(group[key].shape[0])
    return None


def _lokr_fields(modules: Modules, shapes: dict[str, tuple[int, ...]], source: Path) -> dict[str, Any]:
    ranks = {name: rank for name, group in modules.items() if (rank := _lokr_rank(group)) is not None}
    full = [name for name in modules if name not in ranks]
    if ranks:
        rank = int(one_value(ranks, "the rank", source, "split the file into one adapter per rank"))
        alpha = one_value({name: saved_alpha(modules[name], rank) for name in ranks}, "alpha", source,
                          "split the file into one adapter per alpha")
        if full and alpha != rank:
            raise AdapterFileError(
                f"{source}: LoKr module {full[0]!r} has two full factors, which LyCORIS runs at scale 1, beside "
                f"low-rank modules at alpha/r = {alpha:g}/{rank}; deltatune's LoKr has one scale: split the file")
    else:  # every factor full: any rank at least half of each second factor's sides keeps them full (scale 1)
        rank = max(max(group["lokr_w2"].shape[:2]) for group in modules.values())
        alpha = float(rank)
    return {"r": rank, "alpha": alpha, "use_effective_conv2d": any("lokr_t2" in g for g in modules.values()),
            "decompose_both": any("lokr_w1_a" in g for g in modules.values()),
            "decompose_factor": _decompose_factor(modules, shapes, source)}


def _first_factor(group: dict[str, Tensor]) -> tuple[int, int]:
    """(a, c): the shape of W₁ (out = a·b, in = c·d)."""
    if "lokr_w1" in group:
        return int(group["lokr_w1"].shape[0]), int(group["lokr_w1"].shape[1])
    return int(group["lokr_w1_a"].shape[0]), int(group["lokr_w1_b"].shape[1])


def _decompose_factor(modules: Modules, shapes: dict[str, tuple[int, ...]], source: Path) -> int:
    """The decompose_factor under which every module's (out, in) splits as its W₁ says."""
    firsts = {name: _first_factor(group) for name, group in modules.items()}

    def reproduces(factor: int) -> bool:
        return all(factorization(shapes[name][0], factor)[0] == a and factorization(shapes[name][1], factor)[0] == c
                   for name, (a, c) in firsts.items())

    for factor in [-1, *sorted({size for pair in firsts.values() for size in pair})]:
        if reproduces(factor):
            return factor
    name, (a, c) = next(iter(firsts.items()))
    raise AdapterFileError(f"{source}: no decompose_factor splits every module as the file does (first: {name!r}, "
                           f"weight {shapes[name][:2]} with W1 {a}x{c}; LyCORIS's unbalanced_factorization?); "
                           "deltatune's LoKr cannot reproduce it")


def _lokr_file_alpha(rank: int, alpha: float, suffixes: set[str], where: str) -> float:
    """A module with both factors full runs at scale 1 in LyCORIS files: writable only when alpha / r is 1."""
    if suffixes & {"lokr_w1_a", "lokr_w2_a"}:
        return alpha
    if alpha != rank:
        raise DeltatuneError(f"{where}: both LoKr factors are full matrices here, which LyCORIS files run at scale 1, "
                             f"but this adapter scales by alpha/rank = {alpha:g}/{rank}; set alpha = rank, or save "
                             "with format='deltatune'")
    return float(rank)


LOHA_KIND = register_kind(KohyaKind("loha", "LOHA", "lycoris.kohya", {n: n for n in LOHA_NAMES}, _loha_fields))
LOKR_KIND = register_kind(KohyaKind("lokr", "LOKR", "lycoris.kohya", {n: n for n in LOKR_NAMES}, _lokr_fields,
                                    file_alpha=_lokr_file_alpha))

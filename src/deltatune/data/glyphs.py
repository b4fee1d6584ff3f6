"""The glyph images: letters and digits rendered from Debian's free fonts, 16x16 grayscale, read offline.

`python -m deltatune.data.build_glyphs` renders them once (Pillow and fontTools, build time only) into
files/glyphs.safetensors; this module only reads that file, so the runtime needs neither Pillow nor the fonts.
Licences of the fonts: files/FONTS_LICENSES.txt; font list, packages and splits: files/glyphs_manifest.json.

Classes: the 62 *source* classes '0'-'9', 'A'-'Z', 'a'-'z' (label ids 0-61 in that order, so digits 0-9 have the
label ids of scikit-learn's handwritten digits) and 24 *novel* classes, Greek letters whose shapes are not Latin
ones (label ids 62-85 in `NOVEL_CLASSES` order), kept out of every pretraining for the `glyphs-novel-*` tasks.
Splits are by font family group (all styles of a family, and fonts cloned from one design, on one side).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from deltatune.errors import DeltatuneError

FILES_DIR = Path(__file__).resolve().parent / "files"
GLYPHS_FILE = "glyphs.safetensors"
MANIFEST_FILE = "glyphs_manifest.json"
LICENSES_FILE = "FONTS_LICENSES.txt"
IMAGE_SIZE = 16
SOURCE_CLASSES = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Greek letters that do not look like a Latin letter or digit (no A B E Z H I K M N O P T Y X, no o, no
# iota/kappa/nu/rho/tau/upsilon/chi, which read as Latin at 16 px); zeta and xi dropped as too intricate at 16 px.
NOVEL_CLASSES = tuple("ΓΔΘΛΞΠΣΦΨΩαβγδεηθλμπσφψω")
ALL_CLASSES = SOURCE_CLASSES + NOVEL_CLASSES
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
ARRAY_NAMES = ("images", "labels", "font_ids", "splits", "variants")


class GlyphDataError(DeltatuneError, OSError):
    """The shipped glyph arrays are missing or do not match their manifest."""


@functools.lru_cache(maxsize=1)
def _read_glyph_file(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise GlyphDataError(
            f"glyph arrays not found at {path}: expected the packaged file; reinstall deltatune or rebuild them "
            "with `python -m deltatune.data.build_glyphs`"
        )
    arrays = load_file(path)
    # ids are stored as small integers to keep the file small; every consumer gets int64
    return {name: tensor if name == "images" else tensor.to(torch.long) for name, tensor in arrays.items()}


def read_glyphs(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """All glyph images and their labels, as a dict of tensors of equal length N:

    - `images` (N, 16, 16) uint8, white glyph (255) on black (0);
    - `labels` (N,) int64, index into `ALL_CLASSES` (0-61 source, 62-85 novel);
    - `font_ids` (N,) int64, index into the manifest's `fonts` list;
    - `splits` (N,) int64, the font's split (`SPLIT_IDS`: 0 train, 1 validation, 2 test);
    - `variants` (N,) int64, 0 = the plain rendering, 1.. = seeded jitters (scale, shift, rotation, stroke).

    The tensors are shared between calls (cached): clone before changing them in place.
    """
    return _read_glyph_file(str(Path(path) if path else FILES_DIR / GLYPHS_FILE))


def read_glyph_manifest() -> dict:
    """The build manifest: fonts (file, package, family, group, split), skipped fonts, counts, sha256."""
    return json.loads((FILES_DIR / MANIFEST_FILE).read_text(encoding="utf-8"))


def glyph_subset(
    arrays: dict[str, torch.Tensor], split: str, novel: bool = False, variants: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (n, 1, 16, 16) float32 in [0, 1], labels (n,) int64) of one split of the source or novel classes.

    Labels are re-based to the class set: 0-61 for the source classes, 0-23 for the novel ones.
    `variants` keeps only those variant ids (None: all).
    """
    first_novel = len(SOURCE_CLASSES)
    keep = arrays["splits"] == SPLIT_IDS[split]
    keep &= (arrays["labels"] >= first_novel) if novel else (arrays["labels"] < first_novel)
    if variants is not None:
        keep &= torch.isin(arrays["variants"], torch.tensor(variants, dtype=torch.long))
    pixels = arrays["images"][keep].to(torch.float32).div(255.0).unsqueeze(1)
    labels = arrays["labels"][keep] - (first_novel if novel else 0)
    return pixels, labels

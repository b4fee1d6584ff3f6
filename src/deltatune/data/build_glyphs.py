"""Render the committed glyph arrays from the free fonts Debian installs (build time only: Pillow, fontTools).

    python -m deltatune.data.build_glyphs [--font-dirs /usr/share/fonts /usr/share/texmf/fonts] [--out DIR]

Writes, into src/deltatune/data/files/ by default:

- `glyphs.safetensors`: `images` (N, 16, 16) uint8 and int64 `labels`, `font_ids`, `splits`, `variants`
  (see deltatune.data.glyphs.read_glyphs);
- `glyphs_manifest.json`: every font used (file, Debian package, family, group, split, sha256), every font
  skipped and why, per-split label counts, and the sha256 of glyphs.safetensors;
- `FONTS_LICENSES.txt`: for each Debian package whose fonts were used, /usr/share/doc/<pkg>/copyright verbatim.

Rules (seed 0, deterministic: two runs give byte-identical files):

1. Candidates: every .ttf / .otf file under the font folders, resolved through symlinks, identical files (sha256)
   kept once. Type 1 files (.t1, .pfb) are skipped: here they are copies of urw-base35's .otf fonts.
2. A font is skipped when it is a symbol, dingbat, math, music, keycap or small-capital font (family name:
   keycaps and small capitals would mislabel glyphs), lacks one of the 62
   source characters in its cmap, or renders one of them as nothing or as its .notdef box (compared with the
   rendering of the private-use code point U+E000); also when its family and style were already taken (e.g.
   liberation vs liberation2), or when its plain renderings of the 62 characters are within `DUPLICATE_DISTANCE`
   of a font already taken (Noto's script fonts carry copies of Noto Sans's Latin letters). A font contributes
   novel (Greek) images only if it has all 24 novel characters.
3. Rendering: each character is drawn at 64 px, cropped to its ink, optionally rotated, scaled by one factor per
   font (so that the font's largest source glyph spans `TARGET_PIXELS`; relative sizes within a font, like o vs O,
   are kept), resampled with Lanczos and centred by its bounding box on a 16x16 black canvas. Variant 0 is the
   plain rendering; variants 1.. draw a scale factor in [0.85, 1.1], a rotation in [-8, 8] degrees, a stroke of 0-2
   px at 64 px (thicker strokes) and a shift of -1..1 px, from `random.Random(f"{seed}:{font sha256}:{char}:{v}")`.
4. Split by family group: a group is the typographic family's first word (all DejaVu, all Noto, all Liberation,
   ...), except for fonts cloned from one design, which share a group (`CLONE_GROUPS`: URW's Nimbus Roman, TeX Gyre
   Termes and FreeSerif are one group, and so on; Hack is DejaVu Sans Mono's offspring, Open Sans is Noto Sans's
   parent). Groups are sorted, shuffled with `random.Random(seed)` and dealt to train / validation / test until each
   split reaches its share of the fonts (`SPLIT_SHARES`), test and validation first.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltatune.core.atomic import atomic_write_text
from deltatune.data.glyphs import (
    FILES_DIR,
    GLYPHS_FILE,
    IMAGE_SIZE,
    LICENSES_FILE,
    MANIFEST_FILE,
    NOVEL_CLASSES,
    SOURCE_CLASSES,
    SPLIT_IDS,
    GlyphDataError,
)

DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/share/texmf/fonts")
DPKG_INFO = Path("/var/lib/dpkg/info")
RENDER_PIXELS = 64
TARGET_PIXELS = 13
MAX_PIXELS = 15  # a jittered glyph never touches more than 15 of the 16 pixels
VARIANTS = 2
DUPLICATE_DISTANCE = 0.02  # mean |difference| (0-1 scale) of the 62 plain renderings below which a font is a copy
SPLIT_SHARES = {"test": 0.15, "validation": 0.15}  # train takes the rest
MAX_STYLES_PER_FAMILY = 6
MAX_FONTS_PER_GROUP = 12  # Latin Modern alone has 45 distinct fonts; the cap keeps the file under 10 MB
# keycaps (Linux Biolinum Keyboard) and small capitals (their lower case is drawn as capitals) mislabel a glyph
SKIPPED_FAMILY_WORDS = ("symbol", "dingbat", "math", "music", "d050000l", "keyboard", "caps")
NOTDEF_PROBE = "\ue000"
STYLE_PREFERENCE = ("regular", "bold", "italic", "bold italic", "oblique", "bold oblique")
# Fonts drawn from one design go to one split (lower-case typographic family -> group).
CLONE_GROUPS = {
    "nimbus roman": "times", "tex gyre termes": "times", "freeserif": "times",
    "nimbus sans": "helvetica", "nimbus sans narrow": "helvetica", "tex gyre heros": "helvetica",
    "tex gyre heros cn": "helvetica", "freesans": "helvetica",
    "nimbus mono ps": "courier", "tex gyre cursor": "courier", "freemono": "courier",
    "urw gothic": "avantgarde", "tex gyre adventor": "avantgarde",
    "urw bookman": "bookman", "tex gyre bonum": "bookman",
    "c059": "schoolbook", "tex gyre schola": "schoolbook",
    "p052": "palatino", "tex gyre pagella": "palatino",
    "z003": "chancery", "tex gyre chorus": "chancery",
    "hack": "dejavu", "open sans": "noto", "lm": "latin", "carlito": "carlito", "caladea": "caladea",
}


@dataclass
class FontCandidate:
    path: Path
    sha256: str
    package: str
    family: str = ""
    style: str = ""
    group: str = ""
    has_novel: bool = False
    plain: np.ndarray | None = field(default=None, repr=False)  # (62, 16, 16) uint8 plain renderings


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise GlyphDataError(
            "building the glyph arrays needs Pillow: install it with `pip install pillow` (build time only)"
        ) from None
    return Image, ImageDraw, ImageFont


def dpkg_owners(info_dir: Path = DPKG_INFO) -> dict[str, str]:
    """Installed file path -> Debian package, from dpkg's *.list files (empty when dpkg is absent)."""
    owners: dict[str, str] = {}
    for listing in sorted(info_dir.glob("*.list")):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
            owners.setdefault(line, package)
    return owners


def package_of(path: Path, owners: dict[str, str]) -> str:
    return owners.get(str(path)) or owners.get(str(path.resolve())) or "unknown"


def font_files(font_dirs: Iterable[str]) -> tuple[list[Path], list[dict]]:
    """Sorted .ttf/.otf paths under the folders, and the Type 1 files skipped (as manifest rows)."""
    found, skipped = [], []
    for folder in font_dirs:
        for path in sorted(Path(folder).rglob("*")):
            suffix = path.suffix.lower()
            if suffix in (".ttf", ".otf") and path.is_file():
                found.append(path)
            elif suffix in (".t1", ".pfb"):
                skipped.append({"file": str(path), "reason": "Type 1 copy of an .otf font"})
    return found, skipped


def unique_candidates(paths: Sequence[Path], owners: dict[str, str]) -> tuple[list[FontCandidate], list[dict]]:
    """One candidate per distinct file content (first path in sorted order wins)."""
    seen: dict[str, Path] = {}
    candidates, skipped = [], []
    for path in paths:
        digest = hashlib.sha256(path.resolve().read_bytes()).hexdigest()
        if digest in seen:
            skipped.append({"file": str(path), "reason": f"identical file to {seen[digest]}"})
            continue
        seen[digest] = path
        candidates.append(FontCandidate(path=path, sha256=digest, package=package_of(path, owners)))
    return candidates, skipped


def read_names_and_cmap(candidate: FontCandidate) -> set[int]:
    """Fill family/style from the name table (typographic names first); return the cmap's code points."""
    from fontTools.ttLib import TTFont

    with TTFont(str(candidate.path), lazy=True, fontNumber=0) as font:
        names = font["name"]
        family = names.getDebugName(16) or names.getDebugName(1) or candidate.path.stem
        style = names.getDebugName(17) or names.getDebugName(2) or "Regular"
        cmap = font.getBestCmap() or {}
    candidate.family, candidate.style = family.strip(), style.strip()
    return set(cmap)


def family_group(family: str) -> str:
    """The split group of a family: its clone group, else its first word (lower case)."""
    lowered = family.lower()
    for name in sorted(CLONE_GROUPS, key=len, reverse=True):
        if lowered == name or lowered.startswith(name + " "):
            return CLONE_GROUPS[name]
    return re.split(r"[\s-]+", lowered)[0]


def render_ink(font, char: str, stroke: int = 0):
    """The character drawn white on black at 64 px, cropped to its ink (None when it draws nothing)."""
    image_module, draw_module, _ = _pil()
    left, top, right, bottom = font.getbbox(char, stroke_width=stroke)
    pad = 4 + stroke
    canvas = image_module.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    draw_module.Draw(canvas).text((pad - left, pad - top), char, font=font, fill=255, stroke_width=stroke,
                                  stroke_fill=255)
    box = canvas.getbbox()
    return canvas.crop(box) if box else None


@dataclass(frozen=True)
class Jitter:
    scale: float = 1.0
    rotation: float = 0.0
    stroke: int = 0
    shift: tuple[int, int] = (0, 0)


def draw_jitter(seed: int, font_sha: str, char: str, variant: int) -> Jitter:
    """Variant 0 is plain; others draw scale, rotation, stroke and shift from a string-seeded RNG."""
    if variant == 0:
        return Jitter()
    rng = random.Random(f"{seed}:{font_sha}:{ord(char)}:{variant}")
    return Jitter(
        scale=rng.uniform(0.85, 1.1), rotation=rng.uniform(-8.0, 8.0), stroke=rng.choice((0, 0, 1, 2)),
        shift=(rng.randint(-1, 1), rng.randint(-1, 1)),
    )


def place_on_canvas(ink, pixels_per_ink: float, jitter: Jitter) -> np.ndarray:
    """Scale the (rotated) ink crop, then centre it (plus the shift) on a 16x16 black canvas."""
    image_module, _, _ = _pil()
    if jitter.rotation:
        ink = ink.rotate(jitter.rotation, resample=image_module.Resampling.BICUBIC, expand=True, fillcolor=0)
        ink = ink.crop(ink.getbbox() or (0, 0, ink.width, ink.height))
    scale = pixels_per_ink * jitter.scale
    scale = min(scale, MAX_PIXELS / max(ink.width, ink.height))
    width, height = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
    small = ink.resize((width, height), resample=image_module.Resampling.LANCZOS)
    left = min(max((IMAGE_SIZE - width) // 2 + jitter.shift[0], 0), IMAGE_SIZE - width)
    top = min(max((IMAGE_SIZE - height) // 2 + jitter.shift[1], 0), IMAGE_SIZE - height)
    canvas = image_module.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    canvas.paste(small, (left, top))
    return np.asarray(canvas, dtype=np.uint8)


def source_inks(font, candidate: FontCandidate) -> tuple[list, str]:
    """Plain ink crops of the 62 source characters, or ([], reason) when one is missing or is the .notdef box."""
    probe = render_ink(font, NOTDEF_PROBE)
    probe_bytes = probe.tobytes() if probe else None
    inks = []
    for char in SOURCE_CLASSES:
        ink = render_ink(font, char)
        if ink is None:
            return [], f"{char!r} renders nothing"
        if probe_bytes is not None and ink.size == probe.size and ink.tobytes() == probe_bytes:
            return [], f"{char!r} renders as the .notdef box"
        inks.append(ink)
    return inks, ""


def screen_font(candidate: FontCandidate) -> str:
    """Why the font is skipped ('' when it is usable); fills family, style, group, has_novel."""
    try:
        cmap = read_names_and_cmap(candidate)
    except Exception as error:  # a font file fontTools cannot parse is skipped, with the reason recorded
        return f"unreadable by fontTools: {type(error).__name__}"
    candidate.group = family_group(candidate.family)
    lowered = candidate.family.lower()
    if any(word in lowered for word in SKIPPED_FAMILY_WORDS):
        return "symbol, dingbat, math or music font"
    missing = [char for char in SOURCE_CLASSES if ord(char) not in cmap]
    if missing:
        return f"no glyph for {len(missing)} source characters (first {missing[0]!r})"
    candidate.has_novel = all(ord(char) in cmap for char in NOVEL_CLASSES)
    return ""


def ink_scale(inks: Sequence) -> float:
    """Pixels per 64-px ink pixel so that the font's largest source glyph spans TARGET_PIXELS."""
    return TARGET_PIXELS / max(max(ink.width, ink.height) for ink in inks)


def is_copy(plain: np.ndarray, kept: Sequence[FontCandidate]) -> str:
    """The kept font whose plain renderings are (nearly) the same as these, or ''."""
    for other in kept:
        distance = np.abs(plain.astype(np.float32) - other.plain.astype(np.float32)).mean() / 255.0
        if distance < DUPLICATE_DISTANCE:
            return str(other.path)
    return ""


def screen_and_render_plain(candidates: Sequence[FontCandidate]) -> tuple[list[FontCandidate], list[dict]]:
    """The usable fonts (plain renderings filled), and the skipped ones with their reasons."""
    _, _, font_module = _pil()
    kept: list[FontCandidate] = []
    skipped: list[dict] = []
    taken_names: dict[tuple[str, str], str] = {}
    for candidate in candidates:
        reason = screen_font(candidate)
        name_key = (candidate.family.lower(), candidate.style.lower())
        if not reason and name_key in taken_names:
            reason = f"same family and style as {taken_names[name_key]}"
        if not reason:
            font = font_module.truetype(str(candidate.path), RENDER_PIXELS)
            inks, reason = source_inks(font, candidate)
        if not reason:
            scale = ink_scale(inks)
            candidate.plain = np.stack([place_on_canvas(ink, scale, Jitter()) for ink in inks])
            copy_of = is_copy(candidate.plain, kept)
            reason = f"renders as a copy of {copy_of}" if copy_of else ""
        if reason:
            skipped.append({"file": str(candidate.path), "reason": reason})
            continue
        taken_names[name_key] = str(candidate.path)
        kept.append(candidate)
    return kept, skipped


def style_rank(style: str) -> tuple[int, str]:
    lowered = style.lower()
    return (STYLE_PREFERENCE.index(lowered) if lowered in STYLE_PREFERENCE else len(STYLE_PREFERENCE), lowered)


def cap_styles(fonts: Sequence[FontCandidate]) -> tuple[list[FontCandidate], list[dict]]:
    """At most MAX_STYLES_PER_FAMILY fonts per family and MAX_FONTS_PER_GROUP per group, so none dominates.

    Within a family, styles rank regular, bold, italic, bold italic, oblique, bold oblique, then by name; a group
    takes each family's first style, then each family's second, and so on.
    """
    by_family: dict[str, list[FontCandidate]] = {}
    for font in fonts:
        by_family.setdefault(font.family.lower(), []).append(font)
    rank_in_family: dict[str, int] = {}
    skipped = []
    for members in by_family.values():
        ranked = sorted(members, key=lambda font: (style_rank(font.style), str(font.path)))
        rank_in_family.update({str(font.path): rank for rank, font in enumerate(ranked)})
        skipped += [{"file": str(font.path), "reason": f"family capped at {MAX_STYLES_PER_FAMILY} styles"}
                    for font in ranked[MAX_STYLES_PER_FAMILY:]]
    by_group: dict[str, list[FontCandidate]] = {}
    for font in fonts:
        if rank_in_family[str(font.path)] < MAX_STYLES_PER_FAMILY:
            by_group.setdefault(font.group, []).append(font)
    kept = []
    for members in by_group.values():
        ranked = sorted(members, key=lambda font: (rank_in_family[str(font.path)], font.family.lower(), str(font.path)))
        kept += ranked[:MAX_FONTS_PER_GROUP]
        skipped += [{"file": str(font.path), "reason": f"group capped at {MAX_FONTS_PER_GROUP} fonts"}
                    for font in ranked[MAX_FONTS_PER_GROUP:]]
    return sorted(kept, key=lambda font: str(font.path)), skipped


def assign_splits(fonts: Sequence[FontCandidate], seed: int) -> dict[str, str]:
    """Group -> split: groups shuffled (seeded) and dealt to test, validation, then train by font counts."""
    sizes: dict[str, int] = {}
    for font in fonts:
        sizes[font.group] = sizes.get(font.group, 0) + 1
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    targets = {split: share * len(fonts) for split, share in SPLIT_SHARES.items()}
    filled = dict.fromkeys(SPLIT_SHARES, 0)
    split_of = {}
    for group in order:
        open_splits = [split for split in SPLIT_SHARES if filled[split] + sizes[group] / 2 <= targets[split]]
        split = open_splits[0] if open_splits else "train"
        filled[split] = filled.get(split, 0) + sizes[group]
        split_of[group] = split
    return split_of


def render_font(font_index: int, candidate: FontCandidate, split: str, seed: int) -> list[tuple]:
    """(image, label, font id, split id, variant) rows of one font: source classes, then novel ones if covered."""
    _, _, font_module = _pil()
    font = font_module.truetype(str(candidate.path), RENDER_PIXELS)
    scale = ink_scale([render_ink(font, char) for char in SOURCE_CLASSES])
    classes = SOURCE_CLASSES + (NOVEL_CLASSES if candidate.has_novel else ())
    rows = []
    for label, char in enumerate(classes):
        for variant in range(VARIANTS):
            jitter = draw_jitter(seed, candidate.sha256, char, variant)
            ink = render_ink(font, char, jitter.stroke)
            if ink is None:
                continue
            rows.append((place_on_canvas(ink, scale, jitter), label, font_index, SPLIT_IDS[split], variant))
    return rows


def label_counts(labels: np.ndarray, splits: np.ndarray) -> dict[str, dict[str, int]]:
    counts = {}
    for split, split_id in SPLIT_IDS.items():
        values, numbers = np.unique(labels[splits == split_id], return_counts=True)
        counts[split] = {str(int(value)): int(number) for value, number in zip(values, numbers)}
    return counts


def licenses_text(packages: Sequence[str]) -> str:
    """For each package: a header, then /usr/share/doc/<package>/copyright verbatim."""
    parts = [
        "Licences of the fonts rendered into glyphs.safetensors (deltatune.data.build_glyphs).\n"
        "The arrays hold 16x16 renderings of characters of these fonts; each package's copyright file follows,\n"
        "verbatim from /usr/share/doc/<package>/copyright of the Debian system that built them.\n"
    ]
    for package in packages:
        path = Path("/usr/share/doc") / package / "copyright"
        if not path.is_file():
            raise GlyphDataError(f"{path} not found: expected the copyright file of Debian package {package}")
        parts.append(f"\n{'=' * 78}\nDebian package: {package}\n{'=' * 78}\n\n" + path.read_text(encoding="utf-8"))
    return "".join(parts)


def save_arrays(rows: Sequence[tuple], path: Path) -> str:
    """Write the rows as safetensors (byte-reproducible) and return the file's sha256."""
    from safetensors.numpy import save

    images, labels, font_ids, splits, variants = zip(*rows)
    payload = save({
        "images": np.stack(images).astype(np.uint8), "labels": np.asarray(labels, dtype=np.int64),
        # ids fit in small integers (the loader widens them to int64): saves ~0.8 MB
        "font_ids": np.asarray(font_ids, dtype=np.int16), "splits": np.asarray(splits, dtype=np.uint8),
        "variants": np.asarray(variants, dtype=np.uint8),
    })
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)
    return hashlib.sha256(payload).hexdigest()


def select_fonts(font_dirs: Sequence[str]) -> tuple[list[FontCandidate], list[dict]]:
    paths, skipped = font_files(font_dirs)
    candidates, duplicates = unique_candidates(paths, dpkg_owners())
    kept, rejected = screen_and_render_plain(candidates)
    kept, capped = cap_styles(kept)
    return kept, skipped + duplicates + rejected + capped


def build(font_dirs: Sequence[str], out_dir: Path, seed: int = 0) -> dict:
    """Render every usable font, write the arrays, the licences and the manifest; return the manifest."""
    fonts, skipped = select_fonts(font_dirs)
    if not fonts:
        raise GlyphDataError(f"no usable font under {list(font_dirs)}: install e.g. fonts-dejavu-core")
    split_of = assign_splits(fonts, seed)
    rows = []
    for index, font in enumerate(fonts):
        rows += render_font(index, font, split_of[font.group], seed)
    digest = save_arrays(rows, out_dir / GLYPHS_FILE)
    packages = sorted({font.package for font in fonts} - {"unknown"})
    atomic_write_text(out_dir / LICENSES_FILE, licenses_text(packages))
    labels, splits = np.asarray([row[1] for row in rows]), np.asarray([row[3] for row in rows])
    manifest = {
        "build_command": "python -m deltatune.data.build_glyphs", "seed": seed, "image_size": IMAGE_SIZE,
        "variants_per_glyph": VARIANTS, "source_classes": "".join(SOURCE_CLASSES),
        "novel_classes": "".join(NOVEL_CLASSES), "split_ids": SPLIT_IDS, "file": GLYPHS_FILE, "sha256": digest,
        "images": len(rows), "packages": packages, "counts": label_counts(labels, splits),
        "fonts": [
            {"file": str(font.path), "name": font.path.name, "package": font.package, "family": font.family,
             "style": font.style, "group": font.group, "split": split_of[font.group], "novel": font.has_novel,
             "sha256": font.sha256}
            for font in fonts
        ],
        "skipped": skipped,
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.data.build_glyphs", description=__doc__.split("\n")[0])
    parser.add_argument("--font-dirs", nargs="+", default=list(DEFAULT_FONT_DIRS), help="folders searched for fonts")
    parser.add_argument("--out", default=str(FILES_DIR), help=f"output folder (default {FILES_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="jitter and split seed (the committed files use 0)")
    args = parser.parse_args(argv)
    manifest = build(args.font_dirs, Path(args.out), args.seed)
    per_split = {split: sum(1 for font in manifest["fonts"] if font["split"] == split) for split in SPLIT_IDS}
    print(f"{len(manifest['fonts'])} fonts {per_split}, {len(manifest['skipped'])} skipped, "
          f"{manifest['images']} images -> {Path(args.out) / GLYPHS_FILE} (sha256 {manifest['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

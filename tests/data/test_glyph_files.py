"""The committed glyph arrays: hash, shapes, label counts, splits disjoint by font family group, licences."""
from __future__ import annotations

import hashlib

import torch

from deltatune.data import build_glyphs
from deltatune.data.glyphs import (
    ALL_CLASSES,
    FILES_DIR,
    GLYPHS_FILE,
    LICENSES_FILE,
    NOVEL_CLASSES,
    SOURCE_CLASSES,
    SPLIT_IDS,
    glyph_subset,
    read_glyph_manifest,
    read_glyphs,
)

MANIFEST = read_glyph_manifest()


def test_array_file_is_small_and_matches_the_manifest_hash():
    payload = (FILES_DIR / GLYPHS_FILE).read_bytes()
    assert hashlib.sha256(payload).hexdigest() == MANIFEST["sha256"]
    assert len(payload) <= 10_000_000


def test_arrays_have_the_documented_shapes_and_dtypes():
    arrays = read_glyphs()
    count = MANIFEST["images"]
    assert arrays["images"].shape == (count, 16, 16) and arrays["images"].dtype == torch.uint8
    for name in ("labels", "font_ids", "splits", "variants"):
        assert arrays[name].shape == (count,) and arrays[name].dtype == torch.long, name
    assert int(arrays["labels"].max()) == len(ALL_CLASSES) - 1
    assert int(arrays["images"].max()) == 255 and int(arrays["images"].min()) == 0


def test_every_image_has_ink_and_a_black_border_pixel():
    images = read_glyphs()["images"]
    assert bool((images.flatten(1).amax(1) > 0).all())
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert float((corners == 0).float().mean()) > 0.9


def test_label_counts_match_the_manifest_and_every_class_is_in_every_split():
    arrays = read_glyphs()
    for split, split_id in SPLIT_IDS.items():
        values, numbers = torch.unique(arrays["labels"][arrays["splits"] == split_id], return_counts=True)
        assert {str(v): int(n) for v, n in zip(values.tolist(), numbers.tolist())} == MANIFEST["counts"][split]
        assert len(values) == len(SOURCE_CLASSES) + len(NOVEL_CLASSES)


def test_splits_are_disjoint_by_font_family_group_and_fonts_are_distinct():
    fonts = MANIFEST["fonts"]
    split_of_group: dict[str, set[str]] = {}
    for font in fonts:
        split_of_group.setdefault(font["group"], set()).add(font["split"])
        split_of_group.setdefault(font["family"].lower(), set()).add(font["split"])
    assert all(len(splits) == 1 for splits in split_of_group.values())
    assert len({font["sha256"] for font in fonts}) == len(fonts)
    arrays = read_glyphs()
    font_split = torch.tensor([SPLIT_IDS[font["split"]] for font in fonts])
    assert torch.equal(font_split[arrays["font_ids"]], arrays["splits"])
    assert {font["split"] for font in fonts} == set(SPLIT_IDS)


def test_licences_cover_every_package_used():
    text = (FILES_DIR / LICENSES_FILE).read_text(encoding="utf-8")
    packages = {font["package"] for font in MANIFEST["fonts"]}
    assert "unknown" not in packages
    for package in packages:
        assert f"Debian package: {package}\n" in text


def test_subset_rebases_novel_labels_and_scales_pixels():
    arrays = read_glyphs()
    pixels, labels = glyph_subset(arrays, "test", novel=True, variants=(0,))
    assert pixels.shape[1:] == (1, 16, 16) and pixels.dtype == torch.float32
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert set(labels.tolist()) == set(range(len(NOVEL_CLASSES)))


def test_clone_groups_and_first_word_rule():
    assert build_glyphs.family_group("TeX Gyre Termes") == build_glyphs.family_group("Nimbus Roman") == "times"
    assert build_glyphs.family_group("Hack") == "dejavu" == build_glyphs.family_group("DejaVu Sans Mono")
    assert build_glyphs.family_group("Oxygen-Sans") == build_glyphs.family_group("Oxygen Mono")

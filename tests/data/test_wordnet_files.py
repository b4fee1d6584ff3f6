"""The committed WordNet task files: licence, documented counts, disjoint splits, reproducible build."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from deltatune.data import build_wordnet
from deltatune.data.task import SPLITS
from deltatune.data.wordnet import FILES_DIR, SPLIT_SIZES, WORDNET_TASKS, read_split_rows
from deltatune.errors import DeltatuneError

MANIFEST = json.loads((FILES_DIR / build_wordnet.MANIFEST_FILE).read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=sorted(WORDNET_TASKS))
def task_rows(request):
    spec = WORDNET_TASKS[request.param]
    return spec, read_split_rows(spec)


def test_licence_notice_ships_with_the_required_statements():
    text = (FILES_DIR / build_wordnet.LICENSE_FILE).read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved." in text
    assert "Permission to use, copy, modify and distribute this software" in text
    assert 'THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS"' in text
    assert "LICENSEE agrees to preserve same." in text


def test_task_files_are_small_and_match_the_manifest_hashes():
    for name, entry in MANIFEST["tasks"].items():
        payload = (FILES_DIR / entry["file"]).read_bytes()
        assert hashlib.sha256(payload).hexdigest() == entry["sha256"], name
        assert len(payload) < 1_000_000


def test_split_sizes_and_label_counts_are_as_documented(task_rows):
    spec, rows = task_rows
    counts = build_wordnet.label_counts(rows)
    assert counts == MANIFEST["tasks"][spec.name]["counts"]
    for split in SPLITS:
        per_class = [counts[split].get(label, 0) for label in spec.label_names]
        assert sum(per_class) == SPLIT_SIZES[split]
        assert set(counts[split]) == set(spec.label_names)
        if spec.sampling == "balanced":
            assert max(per_class) - min(per_class) <= 1
    if spec.sampling == "stratified":  # proportional to the class pools: shares within one example of exact
        pool = MANIFEST["tasks"][spec.name]["pool_sizes"]
        total = sum(pool.values())
        for label in spec.label_names:
            assert abs(counts["train"][label] - SPLIT_SIZES["train"] * pool[label] / total) < 1


def test_splits_are_disjoint_by_synset_and_by_text(task_rows):
    _, rows = task_rows
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({row["text"].casefold() for row in rows}) == len(rows)
    assert all(row["text"] and '"' not in row["text"][:1] for row in rows)


def test_noun_task_uses_the_ten_largest_noun_categories():
    assert len(WORDNET_TASKS["wordnet-nouns"].label_names) == 10
    assert {"noun.artifact", "noun.person", "noun.plant", "noun.animal"} <= set(
        WORDNET_TASKS["wordnet-nouns"].label_names
    )


@pytest.mark.parametrize(
    ("gloss", "definition"),
    [
        ('a whole (a thing or person) of the same kind; "lard was used"; "the shopkeeper"',
         "a whole (a thing or person) of the same kind"),
        ('remove or withdraw gradually: "These new customs"', "remove or withdraw gradually"),
        ('in fear, "she hurried down the stairs fearfully"', "in fear"),
        ('significant progress (especially in the phrase "make strides")',
         'significant progress (especially in the phrase "make strides")'),
        ("an entity that has physical existence  ", "an entity that has physical existence"),
    ],
)
def test_definition_drops_example_sentences_only(gloss, definition):
    assert build_wordnet.definition_of(gloss) == definition


def test_data_line_parsing_reads_offset_lexname_and_definition():
    line = ('02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the '
            'genus Canis; "the dog barked all night"  \n')
    synset = build_wordnet.parse_data_line(line, build_wordnet.LEXNAMES)
    assert synset == build_wordnet.Synset("02084071-n", "noun.animal", "noun", "a member of the genus Canis")
    line = "00004296 00 s 01 abridged 0 000 | (used of texts) shortened"
    satellite = build_wordnet.parse_data_line(line, build_wordnet.LEXNAMES)
    assert (satellite.lexname, satellite.pos) == ("adj.all", "adjective")


def test_lexname_table_has_the_45_wordnet_files_in_number_order():
    assert len(build_wordnet.LEXNAMES) == 45
    assert build_wordnet.LEXNAMES[5] == "noun.animal" and build_wordnet.LEXNAMES[44] == "adj.ppl"


def test_missing_wordnet_gives_an_installation_hint(tmp_path):
    with pytest.raises(DeltatuneError, match="wordnet-base"):
        build_wordnet.find_wordnet_dir(str(tmp_path))


def test_a_rebuilt_database_gives_byte_identical_files(tmp_path):
    """Needs a local WordNet 3.0 (Debian wordnet-base); CI machines without it skip."""
    try:
        wordnet_dir = build_wordnet.find_wordnet_dir(None)
    except DeltatuneError:
        pytest.skip("WordNet 3.0 is not installed (apt-get install wordnet-base)")
    build_wordnet.build(wordnet_dir, tmp_path, seed=0)
    for name in [*(spec.file_name for spec in WORDNET_TASKS.values()), build_wordnet.LICENSE_FILE,
                 build_wordnet.MANIFEST_FILE]:
        assert (tmp_path / name).read_bytes() == (FILES_DIR / name).read_bytes(), name


def test_gzip_output_is_reproducible_and_readable():
    rows = [{"id": "1-n", "split": "train", "label": "a", "text": "ü"}]
    payload = build_wordnet.gzip_jsonl(rows)
    assert payload == build_wordnet.gzip_jsonl(rows)
    assert json.loads(gzip.decompress(payload)) == rows[0]


def test_a_missing_task_file_names_the_rebuild_command(tmp_path: Path):
    with pytest.raises(DeltatuneError, match="build_wordnet"):
        read_split_rows(WORDNET_TASKS["wordnet-nouns"], tmp_path)

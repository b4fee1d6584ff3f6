"""Build the committed WordNet task files from a WordNet 3.0 installation.

    python -m deltatune.data.build_wordnet [--wordnet-dir /usr/share/wordnet] [--out DIR]

Reads data.noun / data.verb / data.adj / data.adv (Debian/Ubuntu package `wordnet-base`, or the `dict/` folder of
Princeton's WordNet-3.0 tarball) and writes, into src/deltatune/data/files/ by default:

- `<task>.jsonl.gz`: one JSON row per example {id, split, label, text}, rows ordered by split then synset id;
  `id` is "<8-digit byte offset>-<synset type>" (n, v, a, s, r), the synset's key in WordNet 3.0.
- `WORDNET_LICENSE.txt`: WordNet 3.0's licence, verbatim from the database header, which the licence requires
  on every copy, followed by a note on what was derived.
- `wordnet_manifest.json`: source file hashes, the seed, and per-task/split/label counts and file hashes.

The build is deterministic (seed 0, `random.Random`; gzip with a zero timestamp): running it twice gives
byte-identical files. The task rules are documented in deltatune.data.wordnet.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from deltatune.core.atomic import atomic_write_bytes, atomic_write_text
from deltatune.data.sampling import balanced_counts, proportional_counts
from deltatune.data.task import SPLITS
from deltatune.data.wordnet import FILES_DIR, SPLIT_SIZES, WORDNET_TASKS, TaskDataError, WordNetTaskSpec

DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
CANDIDATE_DIRS = ("/usr/share/wordnet", "/usr/local/WordNet-3.0/dict", "/usr/share/wordnet/dict")
LICENSE_FILE = "WORDNET_LICENSE.txt"
MANIFEST_FILE = "wordnet_manifest.json"
POS_OF_SYNSET_TYPE = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# Lexicographer file numbers -> names, from WordNet 3.0's lexnames(5WN); used when the `lexnames` file is absent
# (Debian's wordnet-base does not ship it).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
# An example sentence starts at a double quote that follows ';', ':' or ',' (e.g. `...of joy; "she wept"`).
EXAMPLE_START = re.compile(r'[;:,]\s*"')
QUOTED = re.compile(r'"([^"]*)"')
# Adjective lemmas may end in a syntactic marker: (a) prenominal, (p) predicate, (ip) immediately postnominal.
ADJECTIVE_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    id: str
    lexname: str
    pos: str
    definition: str

    def label(self, kind: str) -> str:
        return self.lexname if kind == "lexname" else self.pos


def find_wordnet_dir(explicit: str | None) -> Path:
    """The first directory holding all four data files: --wordnet-dir, $WNSEARCHDIR, then the usual places."""
    candidates = [explicit] if explicit else [os.environ.get("WNSEARCHDIR"), *CANDIDATE_DIRS]
    for candidate in filter(None, candidates):
        if all((Path(candidate) / name).is_file() for name in DATA_FILES):
            return Path(candidate)
    raise TaskDataError(
        f"no WordNet 3.0 database found in {[c for c in candidates if c]}: expected {', '.join(DATA_FILES)}; "
        "install it (`apt-get install wordnet-base`) or pass --wordnet-dir to the folder holding them"
    )


def read_lexnames(wordnet_dir: Path) -> tuple[str, ...]:
    """Lexicographer file names by number: the `lexnames` file when present, else the lexnames(5WN) table."""
    path = wordnet_dir / "lexnames"
    if not path.is_file():
        return LEXNAMES
    rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(name for _, name, _ in sorted(rows, key=lambda row: int(row[0])))


def read_license(wordnet_dir: Path) -> str:
    """WordNet's licence text, verbatim from the header of data.noun (lines '  <n> <text>  ')."""
    lines = []
    with open(wordnet_dir / "data.noun", encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("  "):
                break
            lines.append(line.strip().split(" ", 1)[1].rstrip() if " " in line.strip() else "")
    text = "\n".join(lines).strip() + "\n"
    if "WordNet 3.0 Copyright 2006 by Princeton University" not in text:
        raise TaskDataError(
            f"{wordnet_dir / 'data.noun'} is not WordNet 3.0: its header lacks the WordNet 3.0 copyright notice; "
            "point --wordnet-dir at a WordNet 3.0 database"
        )
    return text


def definition_of(gloss: str) -> str:
    """The definition part of a gloss: everything before the first quoted example, whitespace normalized."""
    match = EXAMPLE_START.search(gloss)
    definition = gloss[: match.start()] if match else gloss
    return " ".join(definition.split()).strip(" ;:,")


def examples_of(gloss: str) -> tuple[str, ...]:
    """The quoted example sentences of a gloss (those after its definition), whitespace normalized, empty ones
    dropped: `draw air into the lungs; "I can breathe"; "he respired"` -> ("I can breathe", "he respired")."""
    match = EXAMPLE_START.search(gloss)
    if not match:
        return ()
    sentences = (" ".join(text.split()) for text in QUOTED.findall(gloss[match.start():]))
    return tuple(sentence for sentence in sentences if sentence)


def lemmas_of(line: str) -> tuple[str, ...]:
    """A data.* line's words in order (`w_cnt` is hexadecimal; each word is followed by its lex_id), with
    underscores as spaces and adjective markers such as `(p)` removed: `dog`, `domestic dog`, `Canis familiaris`."""
    fields = line.partition(" | ")[0].split(" ")
    count = int(fields[3], 16)
    words = fields[4:4 + 2 * count:2]
    return tuple(ADJECTIVE_MARKER.sub("", word).replace("_", " ") for word in words)


def gloss_of(line: str) -> str:
    """The raw gloss of a data.* line: the text after ' | '."""
    return line.partition(" | ")[2]


def data_lines(wordnet_dir: Path) -> Iterator[str]:
    """Every synset line of the four data files, in file order (licence header lines skipped)."""
    for name in DATA_FILES:
        with open(wordnet_dir / name, encoding="utf-8") as handle:
            yield from (line for line in handle if not line.startswith("  "))


def parse_data_line(line: str, lexnames: Sequence[str]) -> Synset:
    """One data.* line: `offset lex_filenum ss_type w_cnt word lex_id ... | gloss` (wndb(5WN))."""
    fields, _, gloss = line.partition(" | ")
    offset, lex_filenum, synset_type = fields.split(" ", 3)[:3]
    return Synset(
        id=f"{offset}-{synset_type}", lexname=lexnames[int(lex_filenum)],
        pos=POS_OF_SYNSET_TYPE[synset_type], definition=definition_of(gloss),
    )


def read_synsets(wordnet_dir: Path, lexnames: Sequence[str]) -> list[Synset]:
    """Every synset of the four data files with a non-empty definition (licence header lines skipped)."""
    synsets = (parse_data_line(line, lexnames) for line in data_lines(wordnet_dir))
    return [synset for synset in synsets if synset.definition]


def task_pool(spec: WordNetTaskSpec, synsets: Sequence[Synset]) -> dict[str, list[Synset]]:
    """Synsets of the task's classes, one per distinct definition (case-insensitive); conflicting copies dropped."""
    by_text: dict[str, list[Synset]] = {}
    for synset in sorted(synsets, key=lambda s: s.id):
        if synset.label(spec.label_kind) in spec.label_names:
            by_text.setdefault(synset.definition.casefold(), []).append(synset)
    pool: dict[str, list[Synset]] = {label: [] for label in spec.label_names}
    for copies in by_text.values():
        if len({synset.label(spec.label_kind) for synset in copies}) == 1:
            pool[copies[0].label(spec.label_kind)].append(copies[0])
    return pool


def split_counts(spec: WordNetTaskSpec, class_sizes: Sequence[int]) -> dict[str, list[int]]:
    """Per-class example counts of each split, under the task's sampling rule."""
    if spec.sampling == "balanced":
        return {split: balanced_counts(SPLIT_SIZES[split], len(class_sizes)) for split in SPLITS}
    return {split: proportional_counts(SPLIT_SIZES[split], class_sizes) for split in SPLITS}


def sample_rows(spec: WordNetTaskSpec, pool: dict[str, list[Synset]], seed: int) -> list[dict]:
    """Shuffle each class (sorted by id, one seeded RNG) and cut it into the splits; rows sorted by split, id."""
    counts = split_counts(spec, [len(pool[label]) for label in spec.label_names])
    rng = random.Random(seed)
    rows = []
    for class_index, label in enumerate(spec.label_names):
        members = list(pool[label])
        needed = sum(counts[split][class_index] for split in SPLITS)
        if needed > len(members):
            raise TaskDataError(f"{spec.name}: class {label} has {len(members)} definitions, {needed} needed")
        rng.shuffle(members)
        start = 0
        for split in SPLITS:
            for synset in members[start:start + counts[split][class_index]]:
                rows.append({"id": synset.id, "split": split, "label": label, "text": synset.definition})
            start += counts[split][class_index]
    return sorted(rows, key=lambda row: (SPLITS.index(row["split"]), row["id"]))


def gzip_jsonl(rows: Sequence[dict]) -> bytes:
    """Rows as gzipped JSON lines, byte-for-byte reproducible (no file name, zero timestamp)."""
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as handle:
        handle.write(text.encode("utf-8"))
    return buffer.getvalue()


def label_counts(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for row in rows:
        counts[row["split"]][row["label"]] = counts[row["split"]].get(row["label"], 0) + 1
    return counts


def license_notice(license_text: str) -> str:
    return (
        license_text
        + "\n----------------------------------------------------------------------\n"
        "The files wordnet-*.jsonl.gz next to this notice are derived from the WordNet 3.0 database\n"
        "(data.noun, data.verb, data.adj, data.adv): synset offsets, lexicographer file names and the\n"
        "definition part of each gloss, selected and split by deltatune.data.build_wordnet.\n"
    )


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(wordnet_dir: Path, out_dir: Path, seed: int = 0) -> dict:
    """Write every WordNet task file, the licence notice and the manifest to `out_dir`; return the manifest."""
    synsets = read_synsets(wordnet_dir, read_lexnames(wordnet_dir))
    manifest: dict = {
        "source": "Princeton WordNet 3.0", "build_command": "python -m deltatune.data.build_wordnet",
        "seed": seed, "source_sha256": {name: sha256_file(wordnet_dir / name) for name in DATA_FILES},
        "tasks": {},
    }
    atomic_write_text(out_dir / LICENSE_FILE, license_notice(read_license(wordnet_dir)))
    for spec in WORDNET_TASKS.values():
        pool = task_pool(spec, synsets)
        rows = sample_rows(spec, pool, seed)
        payload = gzip_jsonl(rows)
        atomic_write_bytes(out_dir / spec.file_name, payload)
        manifest["tasks"][spec.name] = {
            "file": spec.file_name, "sha256": hashlib.sha256(payload).hexdigest(),
            "pool_sizes": {label: len(pool[label]) for label in spec.label_names}, "counts": label_counts(rows),
        }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.data.build_wordnet", description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", help="folder with data.noun, data.verb, data.adj, data.adv")
    parser.add_argument("--out", default=str(FILES_DIR), help=f"output folder (default {FILES_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the committed files use 0)")
    args = parser.parse_args(argv)
    manifest = build(find_wordnet_dir(args.wordnet_dir), Path(args.out), args.seed)
    for name, task in manifest["tasks"].items():
        sizes = {split: sum(counts.values()) for split, counts in task["counts"].items()}
        print(f"{name}: {sizes} -> {Path(args.out) / task['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build WordNet-LM's data files from a WordNet 3.0 installation: the held-out synsets and the tokenizer.

    python -m deltatune.data.build_wordnet_lm [--wordnet-dir /usr/share/wordnet] [--out DIR]

Reads the four data files with deltatune.data.build_wordnet's parsers and writes, into src/deltatune/data/files/:

- `wordnet-lm-heldout.jsonl.gz`: the held-out synsets, rows {id, split, lemma, pos, gloss, examples} ordered by
  split then id. They never enter pretraining; they are the downstream tasks' data.
- `wordnet-lm-tokenizer.json`: a byte-level BPE (`tokenizers`) trained on the pretraining lines.
- `wordnet_lm_manifest.json`: source hashes, seed, counts, the pretraining corpus hash and the file hashes.

Rules (seed 0): one synset = one line (`deltatune.data.wordnet_lm.synset_line`), its first lemma. Held-out
candidates are noun and verb synsets whose definition (case-insensitive) occurs in no other synset, so no
pretraining line carries a held-out definition; from the candidates sorted by id, `random.Random(seed)` draws
HELDOUT_SHARE of each part of speech's synsets, shuffles them, and cuts test, validation, then train. Every other
synset (all four parts of speech) is pretraining text, in file order. Deterministic: two builds are byte-identical.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deltatune.core.atomic import atomic_write_bytes, atomic_write_text
from deltatune.data.build_wordnet import (
    DATA_FILES,
    data_lines,
    examples_of,
    find_wordnet_dir,
    gloss_of,
    lemmas_of,
    parse_data_line,
    read_lexnames,
    sha256_file,
)
from deltatune.data.build_wordnet import gzip_jsonl as gzip_rows
from deltatune.data.wordnet import FILES_DIR
from deltatune.data.wordnet_lm import (
    HELDOUT_FILE,
    MANIFEST_FILE,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    synset_line,
)

HELDOUT_POS = ("noun", "verb")
HELDOUT_SHARE = 0.03  # of each held-out part of speech's synsets
HELDOUT_SIZES = {"test": 250, "validation": 250}  # train takes the rest of the held-out synsets
VOCAB_SIZE = 4096
MIN_FREQUENCY = 2


@dataclass(frozen=True)
class LmSynset:
    id: str
    pos: str
    lemma: str
    gloss: str  # the definition part of the gloss (build_wordnet.definition_of)
    examples: tuple[str, ...]

    def line(self) -> str:
        return synset_line(self.lemma, self.pos, self.gloss, self.examples)

    def row(self, split: str) -> dict:
        return {"id": self.id, "split": split, "lemma": self.lemma, "pos": self.pos, "gloss": self.gloss,
                "examples": list(self.examples)}


def read_lm_synsets(wordnet_dir: Path) -> list[LmSynset]:
    """Every synset with a non-empty definition, in file order (noun, verb, adj, adv; offset order)."""
    lexnames = read_lexnames(wordnet_dir)
    synsets = []
    for line in data_lines(wordnet_dir):
        parsed = parse_data_line(line, lexnames)
        if parsed.definition:
            synsets.append(LmSynset(parsed.id, parsed.pos, lemmas_of(line)[0], parsed.definition,
                                    examples_of(gloss_of(line))))
    return synsets


def heldout_candidates(synsets: Sequence[LmSynset], pos: str) -> list[LmSynset]:
    """Synsets of `pos` whose definition no other synset shares (case-insensitive), sorted by id."""
    counts = Counter(synset.gloss.casefold() for synset in synsets)
    return sorted((s for s in synsets if s.pos == pos and counts[s.gloss.casefold()] == 1), key=lambda s: s.id)


def split_heldout(synsets: Sequence[LmSynset], seed: int) -> dict[str, list[LmSynset]]:
    """The held-out synsets by split (each sorted by id): HELDOUT_SHARE per part of speech, one seeded RNG."""
    rng = random.Random(seed)
    drawn: list[LmSynset] = []
    for pos in HELDOUT_POS:
        count = round(HELDOUT_SHARE * sum(1 for synset in synsets if synset.pos == pos))
        drawn += rng.sample(heldout_candidates(synsets, pos), count)
    rng.shuffle(drawn)
    test, validation = HELDOUT_SIZES["test"], HELDOUT_SIZES["validation"]
    cuts = {"test": drawn[:test], "validation": drawn[test:test + validation], "train": drawn[test + validation:]}
    return {split: sorted(members, key=lambda s: s.id) for split, members in cuts.items()}


def pretraining_synsets(synsets: Sequence[LmSynset], heldout: dict[str, list[LmSynset]]) -> list[LmSynset]:
    """Every synset not held out, in file order."""
    held_ids = {synset.id for members in heldout.values() for synset in members}
    return [synset for synset in synsets if synset.id not in held_ids]


def pretraining_lines(wordnet_dir: Path, seed: int = 0) -> tuple[list[str], list[dict]]:
    """(the pretraining lines, the held-out rows): what the pretraining script reads."""
    synsets = read_lm_synsets(wordnet_dir)
    heldout = split_heldout(synsets, seed)
    return [synset.line() for synset in pretraining_synsets(synsets, heldout)], heldout_rows(heldout)


def heldout_rows(heldout: dict[str, list[LmSynset]]) -> list[dict]:
    return [synset.row(split) for split in ("train", "validation", "test") for synset in heldout[split]]


def train_tokenizer(lines: Sequence[str]) -> str:
    """A byte-level BPE over the lines (VOCAB_SIZE tokens, <pad> <bos> <eos> first); `encode` prepends <bos>.
    Returns the tokenizer's JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=MIN_FREQUENCY, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    bos = SPECIAL_TOKENS[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    return tokenizer.to_str()


def corpus_sha256(lines: Sequence[str]) -> str:
    """Hash of the pretraining text (lines joined by newlines): the pretraining script checks it."""
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def build(wordnet_dir: Path, out_dir: Path, seed: int = 0) -> dict:
    """Write the held-out file, the tokenizer and the manifest to `out_dir`; return the manifest."""
    synsets = read_lm_synsets(wordnet_dir)
    heldout = split_heldout(synsets, seed)
    lines = [synset.line() for synset in pretraining_synsets(synsets, heldout)]
    rows_payload = gzip_rows(heldout_rows(heldout))
    tokenizer_json = train_tokenizer(lines)
    atomic_write_bytes(out_dir / HELDOUT_FILE, rows_payload)
    atomic_write_text(out_dir / TOKENIZER_FILE, tokenizer_json)
    manifest = {
        "source": "Princeton WordNet 3.0", "build_command": "python -m deltatune.data.build_wordnet_lm",
        "seed": seed, "source_sha256": {name: sha256_file(wordnet_dir / name) for name in DATA_FILES},
        "synsets": len(synsets), "pretraining_lines": len(lines), "pretraining_sha256": corpus_sha256(lines),
        "heldout_share": HELDOUT_SHARE, "heldout_pos": list(HELDOUT_POS),
        "heldout_counts": {split: dict(Counter(s.pos for s in heldout[split])) for split in heldout},
        "files": {HELDOUT_FILE: hashlib.sha256(rows_payload).hexdigest(),
                  TOKENIZER_FILE: hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()},
        "tokenizer": {"vocab_size": VOCAB_SIZE, "min_frequency": MIN_FREQUENCY,
                      "special_tokens": list(SPECIAL_TOKENS)},
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.data.build_wordnet_lm",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", help="folder with data.noun, data.verb, data.adj, data.adv")
    parser.add_argument("--out", default=str(FILES_DIR), help=f"output folder (default {FILES_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="held-out sampling seed (the committed files use 0)")
    args = parser.parse_args(argv)
    manifest = build(find_wordnet_dir(args.wordnet_dir), Path(args.out), args.seed)
    print(f"{manifest['pretraining_lines']} pretraining lines; held out {manifest['heldout_counts']} "
          f"-> {Path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

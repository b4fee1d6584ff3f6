"""WordNet 3.0 gloss classification tasks: their definitions and their loader.

Source: Princeton WordNet 3.0 (data.noun, data.verb, data.adj, data.adv), licence in files/WORDNET_LICENSE.txt.
Each example is one synset's *definition*: the gloss text after '|' with the quoted example sentences removed
(we cut at the first `"` that follows `;`, `:` or `,`), so the text describes the meaning without usage examples
that often repeat the headword. `python -m deltatune.data.build_wordnet` rebuilds the committed split files
files/<task>.jsonl.gz from a WordNet installation; the loader below only reads those files.

Build rules shared by every task (seed 0, fixed): a task's pool is the synsets whose label is in its class list;
definitions that occur more than once are kept once (lowest synset id) or, when the copies disagree on the label,
dropped, so no text appears twice and splits are disjoint by text; each class's members are sorted by synset id,
shuffled by one `random.Random(0)` (classes in label order), and cut into train / validation / test.
Split sizes are 4,000 / 1,000 / 2,000 for every task; per-class counts are `balanced` (equal up to one) or
`stratified` (proportional to the class's pool size, largest-remainder rounding).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.data.datasets import LABELS, TensorDictDataset
from deltatune.data.models import MINILM_DEFAULT_TARGETS, build_minilm_classifier, load_minilm_tokenizer
from deltatune.data.task import SPLITS, Task, limit_train_size
from deltatune.errors import ConfigError, DeltatuneError

FILES_DIR = Path(__file__).resolve().parent / "files"
SPLIT_SIZES = {"train": 4000, "validation": 1000, "test": 2000}
MAX_POSITIONS = 512  # MiniLM's position embeddings


@dataclass(frozen=True)
class WordNetTaskSpec:
    """How one WordNet task is built: which label each synset gets (`label_kind`) and how splits are sampled."""

    name: str
    description: str
    label_names: tuple[str, ...]
    label_kind: str  # "lexname" (lexicographer file, e.g. noun.animal) or "pos" (noun/verb/adjective/adverb)
    sampling: str  # "balanced" or "stratified"

    @property
    def file_name(self) -> str:
        return f"{self.name}.jsonl.gz"


WORDNET_TASKS = {
    spec.name: spec
    for spec in (
        WordNetTaskSpec(
            "wordnet-nouns",
            "WordNet 3.0 noun definition -> lexicographer category (10 largest noun files, balanced); the default",
            # the 10 largest noun lexicographer files of WordNet 3.0, largest first (11,587 ... 2,983 synsets)
            ("noun.artifact", "noun.person", "noun.plant", "noun.animal", "noun.act", "noun.communication",
             "noun.state", "noun.location", "noun.attribute", "noun.substance"),
            "lexname", "balanced",
        ),
        WordNetTaskSpec(
            "wordnet-verbs",
            "WordNet 3.0 verb definition -> lexicographer category (10 largest verb files, stratified)",
            # the 10 largest of the 15 verb files (2,383 ... 547 synsets): too uneven to balance 7,000 examples
            ("verb.change", "verb.contact", "verb.communication", "verb.motion", "verb.social",
             "verb.possession", "verb.stative", "verb.cognition", "verb.creation", "verb.body"),
            "lexname", "stratified",
        ),
        WordNetTaskSpec(
            "wordnet-pos",
            "WordNet 3.0 definition -> part of speech (noun, verb, adjective, adverb; balanced)",
            ("noun", "verb", "adjective", "adverb"),
            "pos", "balanced",
        ),
        WordNetTaskSpec(
            "wordnet-adj",
            "WordNet 3.0 modifier definition -> descriptive adjective, relational adjective or adverb (balanced)",
            # adj.ppl (participial adjectives) has only 60 synsets, so adverbs take its place as the third class
            ("adj.all", "adj.pert", "adv.all"),
            "lexname", "balanced",
        ),
    )
}


class TaskDataError(DeltatuneError, OSError):
    """A shipped task file is missing or does not match its task definition."""


def read_split_rows(spec: WordNetTaskSpec, directory: Path = FILES_DIR) -> list[dict]:
    """The rows {id, split, label, text} of a task's committed split file."""
    path = directory / spec.file_name
    if not path.is_file():
        raise TaskDataError(
            f"task file {path} is missing: expected it in the deltatune package; reinstall deltatune or rebuild "
            "it with `python -m deltatune.data.build_wordnet`"
        )
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _label_indices(spec: WordNetTaskSpec, labels: list[str]) -> torch.Tensor:
    index = {name: position for position, name in enumerate(spec.label_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise TaskDataError(f"task file {spec.file_name} has labels {unknown} outside {spec.label_names}; rebuild it")
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


def tokenize(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """MiniLM token ids and attention mask, truncated and padded to exactly `max_length` tokens."""
    encoded = load_minilm_tokenizer()(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}


def build_text_splits(spec: WordNetTaskSpec, rows: list[dict], max_length: int) -> dict[str, TensorDictDataset]:
    """Tokenize every row once (one tokenizer call) and cut the tensors into the three splits."""
    ordered = [row for split in SPLITS for row in rows if row["split"] == split]
    texts = [row["text"] for row in ordered]
    tensors = {**tokenize(texts, max_length), LABELS: _label_indices(spec, [row["label"] for row in ordered])}
    splits, start = {}, 0
    for split in SPLITS:
        count = sum(1 for row in rows if row["split"] == split)
        window = slice(start, start + count)
        splits[split] = TensorDictDataset({name: tensor[window] for name, tensor in tensors.items()}, texts[window])
        start += count
    return splits


def load_wordnet_task(name: str, *, max_length: int = 32, train_size: int | None = None, seed: int = 0) -> Task:
    """A WordNet task with MiniLM-tokenized splits; `seed` only picks the `train_size` subset (splits are fixed)."""
    if not isinstance(max_length, int) or not 2 <= max_length <= MAX_POSITIONS:
        raise ConfigError(
            f"max_length={max_length!r} is invalid: expected an integer from 2 to {MAX_POSITIONS} tokens "
            "(MiniLM's position limit); 32 covers most WordNet definitions"
        )
    spec = WORDNET_TASKS[name]
    splits = build_text_splits(spec, read_split_rows(spec), max_length)
    return Task(
        name=spec.name, description=spec.description, label_names=spec.label_names,
        train=limit_train_size(splits["train"], train_size, seed),
        validation=splits["validation"], test=splits["test"], model_factory=build_minilm_classifier,
        default_targets=MINILM_DEFAULT_TARGETS,
    )

"""Downstream speech tasks on the pretrained SpeechAST (spoken words synthesized with espeak-ng).

- `speech-keywords`: the pretraining task itself, 25 keywords, splits disjoint by speaker (espeak-ng voice variant);
  the head starts as the pretrained one (the model is at its card accuracy on load).
- `speech-keywords-novel`: 10 words never heard in pretraining (speech.NOVEL_WORDS), same speaker split, a fresh
  head: the downstream keyword task.
- `speech-voices`: which of 12 voices (accent + variant, speech.SPEAKER_VOICES) spoke; train on the 25 pretraining
  words, validate on 4 novel words, test on the other 6 (split by word), a fresh head.

Items are {"spectrogram": (1, 64, 80) float32 (standardized log-mel, deltatune.data.speech), "labels": int64}.
`default_targets` = ("q_proj", "v_proj"), as on GlyphViT. `build_model(head="pretrained" | "fresh")`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.data.datasets import LABELS, TensorDictDataset
from deltatune.data.speech import NOVEL_WORDS, PRETRAIN_WORDS, SPEAKER_VOICES, read_speech, split_arrays
from deltatune.data.speech_ast import AST_DEFAULT_TARGETS, load_speech_ast
from deltatune.data.task import SPLITS, Task, limit_train_size
from deltatune.errors import ConfigError

HEADS = ("pretrained", "fresh")


@dataclass(frozen=True)
class SpeechTaskSpec:
    name: str
    description: str
    label_names: tuple[str, ...]
    files: tuple[str, ...]  # the array files its splits come from (speech.FILES keys)
    pretrained_head: bool


SPEECH_TASKS = {
    spec.name: spec
    for spec in (
        SpeechTaskSpec("speech-keywords", "25 spoken keywords synthesized with espeak-ng, split by speaker; the "
                       "pretraining task (SpeechAST, pretrained here)", PRETRAIN_WORDS,
                       ("keywords-train", "keywords-eval"), True),
        SpeechTaskSpec("speech-keywords-novel", "10 spoken keywords never heard in pretraining, split by speaker, "
                       "fresh head (SpeechAST, pretrained here)", NOVEL_WORDS, ("novel",), False),
        SpeechTaskSpec("speech-voices", "which of 12 espeak-ng voices spoke a word, split by word, fresh head "
                       "(SpeechAST, pretrained here)", SPEAKER_VOICES, ("voices",), False),
    )
}


def build_speech_model(pretrained_head: bool, num_classes: int, head: str | None = None) -> nn.Module:
    """The pretrained SpeechAST with the task's head: the pretrained one (only on speech-keywords) or fresh."""
    head = head or ("pretrained" if pretrained_head else "fresh")
    if head not in HEADS:
        raise ConfigError(f"head={head!r} is invalid: expected one of {HEADS}")
    if head == "pretrained" and not pretrained_head:
        raise ConfigError("head='pretrained' is invalid for this task: its classes were never pretrained; "
                          "pass head='fresh'")
    model = load_speech_ast()
    if head == "fresh":
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)  # from torch's global RNG
    return model


@functools.lru_cache(maxsize=3)
def _speech_splits(name: str) -> dict[str, TensorDictDataset]:
    """The fixed splits of a speech task (cached: they are read-only)."""
    arrays = [read_speech(kind) for kind in SPEECH_TASKS[name].files]
    splits = {}
    for split in SPLITS:
        parts = [split_arrays(part, split) for part in arrays]
        spectrogram = torch.cat([features for features, _ in parts])
        labels = torch.cat([labels for _, labels in parts])
        splits[split] = TensorDictDataset({"spectrogram": spectrogram, LABELS: labels})
    return splits


def load_speech_task(name: str, *, max_length: int = 32, train_size: int | None = None, seed: int = 0) -> Task:
    """A SpeechAST task; `max_length` is accepted for a uniform signature and ignored."""
    del max_length
    spec = SPEECH_TASKS[name]
    splits = _speech_splits(name)
    return Task(
        name=name, description=spec.description, label_names=spec.label_names,
        train=limit_train_size(splits["train"], train_size, seed), validation=splits["validation"],
        test=splits["test"], model_factory=functools.partial(build_speech_model, spec.pretrained_head),
        default_targets=AST_DEFAULT_TARGETS,
    )

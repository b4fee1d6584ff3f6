"""The catalogue of built-in tasks: names, one-line descriptions and `load_task`."""
from __future__ import annotations

import difflib
from collections.abc import Callable

from deltatune.data.diffusion_tasks import DESCRIPTION as DIFFUSION_HANDWRITTEN_DESCRIPTION
from deltatune.data.diffusion_tasks import NAME as DIFFUSION_HANDWRITTEN
from deltatune.data.diffusion_tasks import load_diffusion_handwritten_task
from deltatune.data.digits import DESCRIPTION as DIGITS_DESCRIPTION
from deltatune.data.digits import load_digits_task
from deltatune.data.gloss_generation import DESCRIPTION as GLOSS_GENERATION_DESCRIPTION
from deltatune.data.gloss_generation import NAME as GLOSS_GENERATION
from deltatune.data.gloss_generation import load_gloss_generation_task
from deltatune.data.gloss_retrieval import DESCRIPTION as GLOSS_RETRIEVAL_DESCRIPTION
from deltatune.data.gloss_retrieval import NAME as GLOSS_RETRIEVAL
from deltatune.data.gloss_retrieval import load_gloss_retrieval_task
from deltatune.data.glyph_tasks import GLYPH_TASKS, glyph_task_names, load_glyph_task
from deltatune.data.reverse_dictionary import DESCRIPTION as REVERSE_DICTIONARY_DESCRIPTION
from deltatune.data.reverse_dictionary import NAME as REVERSE_DICTIONARY
from deltatune.data.reverse_dictionary import load_reverse_dictionary_task
from deltatune.data.speech_tasks import SPEECH_TASKS, load_speech_task
from deltatune.data.task import Task, UnknownTaskError
from deltatune.data.wordnet import WORDNET_TASKS, load_wordnet_task

DEFAULT_TASK = "wordnet-nouns"


def _wordnet_loader(name: str) -> Callable[..., Task]:
    return lambda **options: load_wordnet_task(name, **options)


def _glyph_loader(name: str) -> Callable[..., Task]:
    return lambda **options: load_glyph_task(name, **options)


def _speech_loader(name: str) -> Callable[..., Task]:
    return lambda **options: load_speech_task(name, **options)


def _glyph_description(name: str) -> str:
    base, _, backbone = name.rpartition("-")
    return f"{GLYPH_TASKS[base].description} ({'GlyphViT' if backbone == 'vit' else 'GlyphCNN'}, pretrained here)"


_LOADERS: dict[str, tuple[str, Callable[..., Task]]] = {
    **{name: (spec.description, _wordnet_loader(name)) for name, spec in WORDNET_TASKS.items()},
    "digits": (DIGITS_DESCRIPTION, load_digits_task),
    **{name: (_glyph_description(name), _glyph_loader(name)) for name in glyph_task_names()},
    GLOSS_GENERATION: (GLOSS_GENERATION_DESCRIPTION, load_gloss_generation_task),
    REVERSE_DICTIONARY: (REVERSE_DICTIONARY_DESCRIPTION, load_reverse_dictionary_task),
    GLOSS_RETRIEVAL: (GLOSS_RETRIEVAL_DESCRIPTION, load_gloss_retrieval_task),
    DIFFUSION_HANDWRITTEN: (DIFFUSION_HANDWRITTEN_DESCRIPTION, load_diffusion_handwritten_task),
    **{name: (spec.description, _speech_loader(name)) for name, spec in SPEECH_TASKS.items()},
}


def list_tasks() -> list[str]:
    """Names of the built-in tasks, the default (wordnet-nouns) first; see `describe_tasks` for descriptions."""
    return list(_LOADERS)


def describe_tasks() -> dict[str, str]:
    """Built-in task name -> one-line description."""
    return {name: description for name, (description, _) in _LOADERS.items()}


def load_task(name: str, *, max_length: int = 32, train_size: int | None = None, seed: int = 0) -> Task:
    """Load a built-in task with its fixed train / validation / test splits.

    `max_length`: text tasks are tokenized once, truncated and padded to exactly this many tokens (ignored by
    digits). `train_size`: keep a label-stratified subset of the training split of this size, drawn with `seed`
    (`seed` changes nothing else: the splits themselves are fixed).
    """
    if name not in _LOADERS:
        close = difflib.get_close_matches(str(name), _LOADERS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownTaskError(
            f"unknown task {name!r}: expected one of {', '.join(_LOADERS)}; {hint}see deltatune.data.list_tasks()"
        )
    return _LOADERS[name][1](max_length=max_length, train_size=train_size, seed=seed)

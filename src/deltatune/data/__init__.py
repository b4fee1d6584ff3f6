"""Built-in real-data tasks and their models.

    from deltatune.data import load_task, evaluate_accuracy
    task = load_task("wordnet-nouns")          # fixed splits, MiniLM-tokenized, max 32 tokens
    model = task.build_model()                 # SentenceClassifier(MiniLM) with a fresh `classifier` head
    batch = task.collate([task.train[i] for i in range(32)])
    logits = model(**{k: v for k, v in batch.items() if k != "labels"})
    evaluate_accuracy(model, task.test)

Tasks (details in src/deltatune/data/README.md): wordnet-nouns (default), wordnet-verbs, wordnet-pos,
wordnet-adj (WordNet 3.0 definitions, licence in files/WORDNET_LICENSE.txt), digits (scikit-learn), on the
pretrained glyph backbones (GlyphViT, GlyphCNN; fonts' licences in files/FONTS_LICENSES.txt) glyphs-<b>,
glyphs-novel-<b>, glyphs-rotated-<b> and handwritten-<b> for b in vit, cnn, and gloss-generation (held-out
WordNet lemmas -> definitions with WordNet-LM, `load_wordnet_lm()`; MiniLM-scored), and on the pretrained
SpeechAST (`load_speech_ast()`; words synthesized with espeak-ng) speech-keywords, speech-keywords-novel and
speech-voices; `long_tailed(task, imbalance_ratio=50)` gives any classification task a long-tailed training
split (deltatune.data.long_tail).
"""
from deltatune.data.catalog import DEFAULT_TASK, describe_tasks, list_tasks, load_task
from deltatune.data.datasets import TensorDictDataset, collate_dicts, evaluate_accuracy, model_inputs
from deltatune.data.diffusion import GlyphDiffusion, load_glyph_ddpm
from deltatune.data.glyphs import read_glyphs
from deltatune.data.long_tail import long_tailed
from deltatune.data.models import (
    DigitsConvNet,
    DigitsMLP,
    ModelUnavailableError,
    SentenceClassifier,
    load_minilm,
)
from deltatune.data.speech_ast import SpeechAST, load_speech_ast
from deltatune.data.task import Task, UnknownTaskError
from deltatune.data.vision import GlyphCNN, GlyphViT, load_glyph_cnn, load_glyph_vit
from deltatune.data.wordnet_lm import load_wordnet_lm

__all__ = [
    "DEFAULT_TASK", "DigitsConvNet", "DigitsMLP", "GlyphCNN", "GlyphDiffusion", "GlyphViT",
    "ModelUnavailableError", "SentenceClassifier", "SpeechAST", "Task", "TensorDictDataset", "UnknownTaskError",
    "collate_dicts", "describe_tasks", "evaluate_accuracy", "list_tasks", "load_glyph_cnn", "load_glyph_ddpm",
    "load_glyph_vit", "load_minilm", "load_speech_ast", "load_task", "load_wordnet_lm", "long_tailed", "model_inputs",
    "read_glyphs",
]

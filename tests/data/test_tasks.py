"""Loading the WordNet tasks: batch convention, fixed splits, train_size, errors, the MiniLM classifier."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from deltatune.data import (
    DEFAULT_TASK,
    SentenceClassifier,
    UnknownTaskError,
    describe_tasks,
    evaluate_accuracy,
    list_tasks,
    load_task,
    model_inputs,
)
from deltatune.data.glyph_tasks import glyph_task_names
from deltatune.data.models import masked_mean
from deltatune.data.wordnet import SPLIT_SIZES, WORDNET_TASKS
from deltatune.errors import ConfigError, DeltatuneError


@pytest.fixture(scope="module")
def nouns():
    return load_task("wordnet-nouns")


@pytest.fixture(scope="module")
def nouns_model(nouns):
    torch.manual_seed(0)
    return nouns.build_model().eval()


def test_catalogue_lists_every_task_with_a_one_line_description():
    assert list_tasks()[0] == DEFAULT_TASK == "wordnet-nouns"
    assert set(list_tasks()) == {*WORDNET_TASKS, "digits", *glyph_task_names(), "gloss-generation",
                                 "reverse-dictionary", "diffusion-handwritten", "gloss-retrieval",
                                 "speech-keywords", "speech-keywords-novel", "speech-voices"}
    assert all(text and "\n" not in text for text in describe_tasks().values())


def test_unknown_task_names_the_known_tasks():
    with pytest.raises(UnknownTaskError, match="wordnet-nouns.*did you mean 'wordnet-verbs'") as error:
        load_task("wordnet-verb")
    assert isinstance(error.value, DeltatuneError)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(WORDNET_TASKS))
def test_text_batches_follow_the_convention(name):
    task = load_task(name, max_length=24)
    assert task.num_classes == len(task.label_names) == len(WORDNET_TASKS[name].label_names)
    assert [len(task.train), len(task.validation), len(task.test)] == list(SPLIT_SIZES.values())
    batch = task.collate([task.train[i] for i in range(5)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, 24)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["labels"].shape == (5,)
    assert set(task.train.labels.tolist()) == set(range(task.num_classes))
    assert task.extra_trainable == ("classifier",)
    assert task.default_targets == ("query", "value")


def test_splits_are_the_same_on_every_load_and_disjoint(nouns):
    again = load_task("wordnet-nouns")
    assert torch.equal(again.test.tensors["input_ids"], nouns.test.tensors["input_ids"])
    texts = [set(split.texts) for split in (nouns.train, nouns.validation, nouns.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_tokens_start_with_cls_and_padding_is_masked(nouns):
    ids, mask = nouns.train.tensors["input_ids"], nouns.train.tensors["attention_mask"]
    assert (ids[:, 0] == 101).all()  # [CLS]
    assert (ids[mask == 0] == 0).all()  # [PAD]
    assert (mask.sum(1) < 32).float().mean() > 0.9  # 32 tokens hold most definitions whole


def test_train_size_keeps_a_stratified_seeded_subset(nouns):
    small = load_task("wordnet-nouns", train_size=200, seed=1)
    assert len(small.train) == 200
    assert torch.bincount(small.train.labels).tolist() == [20] * 10
    assert set(small.train.texts) <= set(nouns.train.texts)
    assert small.train.texts == load_task("wordnet-nouns", train_size=200, seed=1).train.texts
    assert small.train.texts != load_task("wordnet-nouns", train_size=200, seed=2).train.texts
    assert len(small.test) == len(nouns.test)


@pytest.mark.parametrize("options", [{"train_size": 0}, {"train_size": 4001}, {"max_length": 1}, {"max_length": 600}])
def test_bad_loading_options_raise_config_errors(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        load_task("wordnet-nouns", **options)


def test_classifier_module_paths_and_logits(nouns, nouns_model):
    assert isinstance(nouns_model, SentenceClassifier)
    assert isinstance(nouns_model.get_submodule("backbone.encoder.layer.0.attention.self.query"), nn.Linear)
    assert isinstance(nouns_model.classifier, nn.Linear) and nouns_model.classifier.out_features == 10
    batch = nouns.collate([nouns.test[i] for i in range(4)])
    with torch.no_grad():
        logits = nouns_model(**model_inputs(batch))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_extra_padding_does_not_change_the_logits(nouns_model):
    """Mean pooling must ignore padding: the same text padded to 16 or 40 tokens gives the same logits."""
    short, long = (load_task("wordnet-adj", max_length=length, train_size=8) for length in (16, 40))
    whole = short.train.tensors["attention_mask"][:, -1] == 0  # not truncated at 16 tokens
    with torch.no_grad():
        a = nouns_model(**model_inputs(short.train.tensors))[whole]
        b = nouns_model(**model_inputs(long.train.tensors))[whole]
    assert whole.any()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_masked_mean_matches_a_float64_reference():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0), torch.zeros(4, dtype=torch.float64)])
    torch.testing.assert_close(masked_mean(hidden, mask), expected)


def test_bad_pooling_is_refused(nouns_model):
    with pytest.raises(ConfigError, match="pooling"):
        SentenceClassifier(nouns_model.backbone, 3, pooling="max")


class _Oracle(nn.Module):
    """Predicts the label stored in input position 0 (the dataset below puts it there), or always class 0."""

    def __init__(self, cheat: bool) -> None:
        super().__init__()
        self.cheat = cheat
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, features):
        assert not torch.is_grad_enabled() and not self.training
        index = features[:, 0].long() if self.cheat else torch.zeros(len(features), dtype=torch.long)
        return nn.functional.one_hot(index, 3).float() * self.scale


def test_evaluate_accuracy_counts_correct_predictions_and_restores_the_mode():
    from deltatune.data import TensorDictDataset

    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    dataset = TensorDictDataset({"features": labels[:, None].float(), "labels": labels})
    model = _Oracle(cheat=True).train()
    assert evaluate_accuracy(model, dataset, batch_size=2) == 1.0
    assert model.training
    assert evaluate_accuracy(_Oracle(cheat=False), dataset, batch_size=3) == pytest.approx(3 / 7)
    assert evaluate_accuracy(_Oracle(cheat=False), [dataset[i] for i in range(7)]) == pytest.approx(3 / 7)
    with pytest.raises(DeltatuneError, match="empty"):
        evaluate_accuracy(model, dataset.subset([]))

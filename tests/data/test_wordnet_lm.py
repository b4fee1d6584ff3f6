"""WordNet-LM: the shipped held-out data, tokenizer and weights, the build rules, and LoRA on the Llama."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits
pytest.importorskip("tokenizers")

import deltatune as dt  # noqa: E402
from deltatune.data import build_wordnet, build_wordnet_lm, load_wordnet_lm  # noqa: E402
from deltatune.data import wordnet_lm as lm  # noqa: E402
from deltatune.data.wordnet import FILES_DIR  # noqa: E402

MAX_FILE_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FILES_DIR / lm.MANIFEST_FILE).read_text())


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return lm.read_heldout_rows()


@pytest.fixture(scope="module")
def wordnet_lm():
    return load_wordnet_lm()


def test_shipped_files_match_the_manifest_hashes(manifest):
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((FILES_DIR / name).read_bytes()).hexdigest() == digest, name


def test_heldout_rows_match_the_manifest_counts_and_are_unique(manifest, rows):
    for split, counts in manifest["heldout_counts"].items():
        assert sum(1 for row in rows if row["split"] == split) == sum(counts.values())
    assert [sum(1 for row in rows if row["split"] == split) for split in ("train", "validation", "test")] == [
        2376, 250, 250]
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({row["gloss"].casefold() for row in rows}) == len(rows)
    assert {row["pos"] for row in rows} == {"noun", "verb"}
    assert set(rows[0]) == {"id", "split", "lemma", "pos", "gloss", "examples"}


def test_shipped_files_stay_small():
    for name in (lm.WEIGHTS_FILE, lm.TOKENIZER_FILE, lm.HELDOUT_FILE, lm.CONFIG_FILE, lm.CARD_FILE):
        assert (FILES_DIR / name).stat().st_size <= MAX_FILE_BYTES, name


def test_lemmas_and_examples_are_parsed_from_a_data_line():
    line = ('00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 | draw air '
            'into, and expel out of, the lungs; "I can breathe better when the air is clean"; "The patient is '
            'respiring"  \n')
    assert build_wordnet.lemmas_of(line) == ("breathe", "take a breath", "respire", "suspire")
    assert build_wordnet.examples_of(build_wordnet.gloss_of(line)) == (
        "I can breathe better when the air is clean", "The patient is respiring")
    adjective = "00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance"
    assert build_wordnet.lemmas_of(adjective) == ("abounding", "galore")
    assert build_wordnet.examples_of("existing in abundance") == ()


def _synset(index: int, pos: str, gloss: str) -> build_wordnet_lm.LmSynset:
    return build_wordnet_lm.LmSynset(f"{index:08d}-{pos[0]}", pos, f"word{index}", gloss, ())


def test_heldout_synsets_never_enter_pretraining_and_shared_definitions_are_never_held_out(monkeypatch):
    monkeypatch.setattr(build_wordnet_lm, "HELDOUT_SIZES", {"test": 3, "validation": 3})
    monkeypatch.setattr(build_wordnet_lm, "HELDOUT_SHARE", 0.2)
    synsets = [_synset(i, "noun", f"noun meaning {i}") for i in range(100)]
    synsets += [_synset(100 + i, "verb", f"verb meaning {i}") for i in range(30)]
    synsets += [_synset(200 + i, "adjective", f"adjective meaning {i}") for i in range(20)]
    shared = [_synset(300 + i, "noun", "a shared definition") for i in range(2)]
    synsets += shared
    heldout = build_wordnet_lm.split_heldout(synsets, seed=0)
    held = [synset for members in heldout.values() for synset in members]
    pretraining = build_wordnet_lm.pretraining_synsets(synsets, heldout)
    assert len(held) == round(0.2 * 102) + round(0.2 * 30)
    assert {synset.pos for synset in held} == {"noun", "verb"}
    assert not {s.id for s in held} & {s.id for s in pretraining}
    assert not {s.gloss for s in held} & {s.gloss for s in pretraining}
    assert all(synset in pretraining for synset in shared)
    assert len(held) + len(pretraining) == len(synsets)
    assert build_wordnet_lm.split_heldout(synsets, seed=0) == heldout


def test_wordnet_pretraining_lines_hold_no_heldout_definition(manifest, rows):
    """Needs a local WordNet 3.0 (Debian wordnet-base); machines without it skip."""
    try:
        wordnet_dir = build_wordnet.find_wordnet_dir(None)
    except build_wordnet.TaskDataError:
        pytest.skip("WordNet 3.0 is not installed")
    lines, heldout = build_wordnet_lm.pretraining_lines(wordnet_dir)
    assert heldout == rows
    assert build_wordnet_lm.corpus_sha256(lines) == manifest["pretraining_sha256"]
    glosses = {row["gloss"] for row in rows}
    assert not any(line.partition("): ")[2].split('; "')[0] in glosses for line in lines)


def test_tokenizer_prepends_bos_and_round_trips_text():
    tokenizer = lm.load_wordnet_lm_tokenizer()
    assert len(tokenizer) == build_wordnet_lm.VOCAB_SIZE
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = 'dog (noun): a member of the genus Canis; "the dog barked all night"'
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def _card_subset_loss() -> float:
    card = (FILES_DIR / lm.CARD_FILE).read_text()
    return float(re.search(r"held-out loss, first \d+ test rows[^|]*\| ([0-9.]+)", card).group(1))


def test_shipped_model_reproduces_the_card_heldout_loss(wordnet_lm, rows):
    from deltatune.data.pretrain_wordnet_lm import SUBSET_SIZE

    model, tokenizer = wordnet_lm
    test_rows = [row for row in rows if row["split"] == "test"][:SUBSET_SIZE]
    assert lm.heldout_loss(model, tokenizer, test_rows) == pytest.approx(_card_subset_loss(), abs=2e-3)


def test_shipped_model_is_a_small_tied_llama(wordnet_lm):
    model, _ = wordnet_lm
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) * 2 <= MAX_FILE_BYTES


def _lora_llama(rank: int = 4):
    model, tokenizer = load_wordnet_lm()
    torch.manual_seed(0)
    config = dt.config_for("lora", rank=rank, alpha=8.0, init="random", targets=("q_proj", "v_proj"))
    return dt.adapt(model.eval(), config), tokenizer


def _greedy(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    from deltatune.data.gloss_generation import left_padded, one_torch_thread

    ids, mask = left_padded(tokenizer(prompts)["input_ids"], tokenizer.pad_token_id)
    with one_torch_thread():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def test_lora_on_the_llama_generates_and_merged_equals_unmerged():
    model, tokenizer = _lora_llama()
    prompts = ["dog (noun):", "run (verb):"]
    unmerged = _greedy(model, tokenizer, prompts)
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    model.double()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        dt.merge(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-9)
    model.float()
    assert torch.equal(_greedy(model, tokenizer, prompts), unmerged)
    dt.unmerge(model)
    assert unmerged.shape[1] > tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"].shape[1]


def test_lora_adapter_on_the_llama_saves_and_loads_exactly(tmp_path):
    model, tokenizer = _lora_llama()
    ids = tokenizer(["dog (noun): a"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    dt.save_adapter(model, tmp_path / "adapter")
    fresh, _ = load_wordnet_lm()
    loaded = dt.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_packaged_weights_file_is_world_readable():
    assert (FILES_DIR / lm.WEIGHTS_FILE).stat().st_mode & 0o444 == 0o444


def test_data_files_are_package_files():
    assert Path(lm.__file__).parent / "files" == FILES_DIR

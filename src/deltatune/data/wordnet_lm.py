"""WordNet-LM: a small Llama-architecture causal language model pretrained here on WordNet 3.0 synset lines.

    from deltatune.data.wordnet_lm import load_wordnet_lm
    model, tokenizer = load_wordnet_lm()          # LlamaForCausalLM (float32, eval mode), PreTrainedTokenizerFast
    ids = tokenizer(["dog (noun):"], return_tensors="pt")
    model.generate(**ids, max_new_tokens=24, do_sample=False)

Every synset becomes one text line, `synset_line`: `<lemma> (<pos>): <definition>; "<example>"; ...` (the
synset's first lemma with underscores as spaces, its part of speech, the definition and the quoted example
sentences of its gloss). A fixed seeded set of noun and verb synsets is held out of pretraining: they are the
downstream data (files/wordnet-lm-heldout.jsonl.gz, rows {id, split, lemma, pos, gloss, examples}). Build:
`python -m deltatune.data.build_wordnet_lm`; pretraining: `python -m deltatune.data.pretrain_wordnet_lm`;
recipe and held-out loss: files/wordnet-lm.md. Everything is read from the package files, never the network.
"""
from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.data.models import ModelUnavailableError, _transformers
from deltatune.data.wordnet import FILES_DIR, TaskDataError

HELDOUT_FILE = "wordnet-lm-heldout.jsonl.gz"
MANIFEST_FILE = "wordnet_lm_manifest.json"
TOKENIZER_FILE = "wordnet-lm-tokenizer.json"
WEIGHTS_FILE = "wordnet-lm.safetensors"
CONFIG_FILE = "wordnet-lm.json"
CARD_FILE = "wordnet-lm.md"
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in the trained tokenizer
TIED_KEYS = ("lm_head.weight",)  # tied to model.embed_tokens.weight: not stored in the weights file
# What a method adapts in the LM unless told otherwise: the LoRA paper's Wq, Wv (§7.1).
WORDNET_LM_DEFAULT_TARGETS = ("q_proj", "v_proj")


def prompt_of(lemma: str, pos: str) -> str:
    """The text before a synset's definition: `dog (noun):`."""
    return f"{lemma} ({pos}):"


def synset_line(lemma: str, pos: str, gloss: str, examples: Sequence[str] = ()) -> str:
    """One synset as pretraining text: `dog (noun): a member of the genus Canis; "the dog barked all night"`."""
    quoted = "".join(f'; "{example}"' for example in examples)
    return f"{prompt_of(lemma, pos)} {gloss}{quoted}"


def _package_file(name: str) -> Path:
    path = FILES_DIR / name
    if not path.is_file():
        raise TaskDataError(
            f"{path} is missing: expected it in the deltatune package; reinstall deltatune, or rebuild it with "
            "`python -m deltatune.data.build_wordnet_lm` (data, tokenizer) and "
            "`python -m deltatune.data.pretrain_wordnet_lm` (weights)"
        )
    return path


def read_heldout_rows(directory: Path | None = None) -> list[dict]:
    """The held-out synsets {id, split, lemma, pos, gloss, examples}, ordered by split then synset id."""
    path = (directory / HELDOUT_FILE) if directory is not None else _package_file(HELDOUT_FILE)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def tokenizer_from_file(path: Path) -> Any:
    """A transformers PreTrainedTokenizerFast over a `tokenizers` JSON file, with our special tokens set."""
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right",
    )


@functools.lru_cache(maxsize=1)
def load_wordnet_lm_tokenizer() -> Any:
    """The shipped byte-level BPE tokenizer (cached: it is stateless). `tokenizer(text)` prepends <bos>; padding
    is on the right by default (training items); generation pads on the left itself."""
    return tokenizer_from_file(_package_file(TOKENIZER_FILE))


def read_wordnet_lm_config() -> Any:
    """The shipped LlamaConfig."""
    return _transformers().LlamaConfig.from_json_file(str(_package_file(CONFIG_FILE)))


def load_wordnet_lm_model() -> nn.Module:
    """A fresh LlamaForCausalLM with the shipped weights (stored in bf16, returned in float32, eval mode)."""
    from safetensors.torch import load_file

    config = read_wordnet_lm_config()
    model = _transformers().LlamaForCausalLM(config)
    state = {name: tensor.float() for name, tensor in load_file(str(_package_file(WEIGHTS_FILE))).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(TIED_KEYS):
        raise ModelUnavailableError(
            f"{FILES_DIR / WEIGHTS_FILE} does not fit {CONFIG_FILE}: missing {sorted(set(missing) - set(TIED_KEYS))}, "
            f"unexpected {sorted(unexpected)}; reinstall deltatune or re-run the pretraining"
        )
    model.tie_weights()
    return model.eval()


def load_wordnet_lm() -> tuple[nn.Module, Any]:
    """(LlamaForCausalLM, PreTrainedTokenizerFast) of WordNet-LM, offline, from the package files."""
    return load_wordnet_lm_model(), load_wordnet_lm_tokenizer()


def build_wordnet_lm_model(num_classes: int | None = None) -> nn.Module:
    """Task model factory: a fresh pretrained WordNet-LM in train mode (`num_classes` is ignored: no head)."""
    del num_classes
    return load_wordnet_lm_model().train()


def encode_row_lines(tokenizer: Any, rows: Sequence[dict]) -> list[list[int]]:
    """<bos> synset line <eos> token ids of held-out rows (as the pretraining saw the other synsets)."""
    lines = [synset_line(row["lemma"], row["pos"], row["gloss"], row["examples"]) for row in rows]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(lines)["input_ids"]]


def heldout_loss(model: nn.Module, tokenizer: Any, rows: Sequence[dict], batch_size: int = 64) -> float:
    """Token-mean next-token cross-entropy (nats) of the rows' synset lines, each line scored on its own."""
    import torch

    device = next(model.parameters()).device
    encoded = encode_row_lines(tokenizer, rows)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(chunk):
                ids[row, :len(tokens)] = torch.tensor(tokens)
                mask[row, :len(tokens)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count

"""The model card files/wordnet-lm.md, written by the pretraining script from what it measured."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deltatune.data.build_wordnet_lm import HELDOUT_SHARE, MIN_FREQUENCY, VOCAB_SIZE


def _config_rows(config: Any) -> str:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "rope_parameters")
    return "\n".join(f"| `{name}` | {getattr(config, name, None)} |" for name in fields)


def _sample_rows(samples: Sequence[tuple[str, str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    return "\n".join(f"| `{cell(prompt)}` | {cell(text)} | {cell(truth)} |" for prompt, text, truth in samples)


def write_card(result: dict, config: Any, samples: Sequence[tuple[str, str, str]], *, sequence_length: int,
               subset_size: int) -> str:
    """The card's Markdown: data, tokenizer, config, size, recipe, measured numbers, command, samples."""
    settings = result["settings"]
    command = ("flock /work/wt/heavy.lock python -m deltatune.data.pretrain_wordnet_lm "
               f"--steps {settings['steps']} --batch-size {settings['batch_size']} --lr {settings['lr']} "
               f"--warmup {settings['warmup']} --seed {settings['seed']} --threads {settings['threads']}")

    loss = result["heldout_loss"]
    perplexity, count = math.exp(loss), result["heldout_synsets"]

    return f"""# WordNet-LM

A small Llama-architecture causal language model (transformers `LlamaForCausalLM`), pretrained from scratch on
this machine's CPU on Princeton WordNet 3.0 (licence: WORDNET_LICENSE.txt). Load it offline with
`deltatune.data.load_wordnet_lm()` -> (model, tokenizer).

## Data
One line per synset: `<lemma> (<pos>): <definition>; "<example>"; ...` (first lemma, underscores as spaces;
definition and example sentences of the gloss), e.g. `dog (noun): a member of the genus Canis ...; "the dog
barked all night"`. Held out of pretraining: {100 * HELDOUT_SHARE:.0f}% of the noun and of the verb synsets
({result['heldout_synsets']:,} synsets, drawn with seed 0 among those whose definition no other synset shares),
shipped in wordnet-lm-heldout.jsonl.gz as the downstream data. Pretraining: the other
{result['lines']:,} synsets, {result['corpus_tokens']:,} tokens with
<bos>/<eos>. Build: `python -m deltatune.data.build_wordnet_lm` (manifest: wordnet_lm_manifest.json).

## Tokenizer
Byte-level BPE trained here with `tokenizers` on the pretraining lines: vocabulary {VOCAB_SIZE} (min frequency
{MIN_FREQUENCY}), special tokens `<pad>`=0, `<bos>`=1, `<eos>`=2; `tokenizer(text)` prepends `<bos>`.
File: wordnet-lm-tokenizer.json (read as a transformers `PreTrainedTokenizerFast`).

## Model
| LlamaConfig field | value |
| --- | --- |
{_config_rows(config)}

{result['parameters']:,} parameters (the output layer is tied to the embeddings); weights in bf16
(wordnet-lm.safetensors; the tied `lm_head.weight` is not stored), config in wordnet-lm.json.

## Recipe
Lines shuffled each epoch (seed + epoch), each `<bos> line <eos>`, concatenated and cut into {sequence_length}-token
blocks; batch {settings['batch_size']} blocks; AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak
learning rate {settings['lr']}, {settings['warmup']} warmup steps then cosine decay to 10%; gradient clipping
1.0; bf16 autocast; `torch.set_num_threads({settings['threads']})` on a 2-core AMD EPYC CPU, torch
{__import__('torch').__version__}, transformers {__import__('transformers').__version__}.

| measure | value |
| --- | --- |
| steps | {result['steps']:,} |
| tokens seen | {result['tokens_seen']:,} ({result['tokens_seen'] / result['corpus_tokens']:.2f} epochs) |
| training seconds | {result['train_seconds']:,} (whole run {result['total_seconds']:,}) |
| final training loss (last step) | {result['final_train_loss']:.4f} |
| held-out loss, all {count:,} held-out synset lines (nats/token) | {loss:.4f} (perplexity {perplexity:.1f}) |
| held-out loss, first {subset_size} test rows (the test suite re-measures it) | {result['heldout_subset_loss']:.4f} |

The held-out loss is measured on the shipped (bf16-rounded) weights.

Command:

    {command}

## Greedy samples (held-out test lemmas, never seen in pretraining)
| prompt | generated (32 new tokens max) | true definition |
| --- | --- | --- |
{_sample_rows(samples)}
"""

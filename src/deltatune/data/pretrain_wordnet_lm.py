"""Pretrain WordNet-LM (a small LlamaForCausalLM) on the WordNet 3.0 pretraining lines, on this machine's CPU.

    flock /work/wt/heavy.lock python -m deltatune.data.pretrain_wordnet_lm --log runs/wordnet-lm.log

Reads the lines with deltatune.data.build_wordnet_lm (WordNet 3.0 installed; the corpus hash must match the
shipped manifest) and the shipped tokenizer; writes files/wordnet-lm.safetensors (bf16, the tied lm_head not
stored), files/wordnet-lm.json (the LlamaConfig) and the model card files/wordnet-lm.md with the measured numbers.

Recipe (seed 0): each epoch the lines are shuffled by `random.Random(seed + epoch)`, each encoded as
<bos> line <eos>, concatenated and cut into SEQUENCE_LENGTH-token blocks (lines may straddle blocks); AdamW
(betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup then cosine decay to 10% of the peak rate,
gradient clipping at 1.0, bf16 autocast on the CPU, `torch.set_num_threads(1)` (see --threads). The held-out
loss is the token-mean cross-entropy of the held-out synsets' lines (never trained on), computed with the weights
as shipped (rounded to bf16).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from deltatune.core.atomic import atomic_write_text
from deltatune.data.build_wordnet import find_wordnet_dir
from deltatune.data.build_wordnet_lm import corpus_sha256, pretraining_lines
from deltatune.data.wordnet import FILES_DIR, TaskDataError
from deltatune.data.wordnet_lm import (
    CARD_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    TIED_KEYS,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    heldout_loss,
    tokenizer_from_file,
)

SEQUENCE_LENGTH = 96
MODEL_SHAPE = {  # LlamaConfig fields; ~4.7M parameters, 9.4 MB in bf16
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 5, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True, "rope_theta": 10000.0,
}
SUBSET_SIZE = 64  # the first 64 held-out test rows: the test suite re-measures their loss on the shipped weights


def build_model(tokenizer, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def encode_lines(tokenizer, lines: Sequence[str]) -> list[list[int]]:
    """<bos> line <eos> token ids of every line (the tokenizer adds <bos>)."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(lines))["input_ids"]]


def epoch_blocks(encoded: Sequence[list[int]], seed: int, epoch: int) -> torch.Tensor:
    """The lines in a seeded order, concatenated and cut into (N, SEQUENCE_LENGTH) blocks (the tail dropped)."""
    order = list(range(len(encoded)))
    random.Random(seed + epoch).shuffle(order)
    stream = torch.tensor([token for index in order for token in encoded[index]], dtype=torch.long)
    count = len(stream) // SEQUENCE_LENGTH
    return stream[: count * SEQUENCE_LENGTH].view(count, SEQUENCE_LENGTH)


def training_batches(encoded: Sequence[list[int]], batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_size, SEQUENCE_LENGTH) batches, epoch after epoch."""
    epoch = 0
    while True:
        blocks = epoch_blocks(encoded, seed, epoch)
        for start in range(0, len(blocks) - batch_size + 1, batch_size):
            yield blocks[start:start + batch_size]
        epoch += 1


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine decay to 10% of it at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train(model: nn.Module, batches: Iterator[torch.Tensor], args: argparse.Namespace, log) -> dict:
    optimizer = build_optimizer(model, args.lr)
    model.train()
    start, tokens, recent = time.perf_counter(), 0, []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += batch.numel()
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  tokens {tokens:,}  {time.perf_counter() - start:.0f} s")
            recent = []
    return {"steps": args.steps, "tokens_seen": tokens, "train_seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": loss.item()}


def shipped_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as stored: bf16, the tied lm_head left out."""
    return {name: tensor.detach().to(torch.bfloat16).contiguous()
            for name, tensor in model.state_dict().items() if name not in TIED_KEYS}


def round_to_shipped(model: nn.Module) -> None:
    """Make the in-memory weights exactly what the loader will read (bf16 rounded, back in float32)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())


def save_weights(model: nn.Module, out_dir: Path) -> None:
    from safetensors.torch import save_file

    partial = out_dir / f".{WEIGHTS_FILE}.partial"  # then renamed: a crash never leaves a torn weights file
    save_file(shipped_state(model), str(partial))
    partial.chmod(0o644)  # safetensors creates it private; package files are world-readable
    os.replace(partial, out_dir / WEIGHTS_FILE)
    model.config.to_json_file(str(out_dir / CONFIG_FILE))


def check_corpus(lines: Sequence[str]) -> None:
    """The lines must be the shipped manifest's (whatever --out says: a re-run elsewhere uses the same data)."""
    manifest = json.loads((FILES_DIR / MANIFEST_FILE).read_text())
    if corpus_sha256(lines) != manifest["pretraining_sha256"]:
        raise TaskDataError(
            f"the WordNet pretraining lines do not match {FILES_DIR / MANIFEST_FILE}: rebuild the data first with "
            "`python -m deltatune.data.build_wordnet_lm`"
        )


def sample_glosses(model: nn.Module, tokenizer, rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """(prompt, greedy continuation, true gloss) for a few held-out synsets."""
    from deltatune.data.gloss_generation import generate_texts, prompt_ids_of_rows

    prompts = prompt_ids_of_rows(tokenizer, rows)
    generated = generate_texts(model, tokenizer, prompts, max_new_tokens=32)
    return [(f"{row['lemma']} ({row['pos']}):", text, row["gloss"]) for row, text in zip(rows, generated)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.data.pretrain_wordnet_lm",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", help="folder with data.noun, data.verb, data.adj, data.adv")
    parser.add_argument("--out", default=str(FILES_DIR), help=f"output folder (default {FILES_DIR})")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core CPU two threads stalled at every "
                             "barrier, 4-12 s per step against 1.7 s with one)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--log", help="also append the log lines to this file")
    parser.add_argument("--no-save", action="store_true", help="measure only: write no files")
    args = parser.parse_args(argv)
    from deltatune.data.wordnet_lm_card import write_card

    def log(message: str) -> None:
        print(message, flush=True)
        if args.log:
            with open(args.log, "a", encoding="utf-8") as handle:
                handle.write(message + "\n")

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    begin = time.perf_counter()
    lines, heldout = pretraining_lines(find_wordnet_dir(args.wordnet_dir), args.seed)
    check_corpus(lines)
    tokenizer = tokenizer_from_file(FILES_DIR / TOKENIZER_FILE)  # the shipped tokenizer, also for a re-run elsewhere
    encoded = encode_lines(tokenizer, lines)
    log(f"{len(lines):,} lines, {sum(map(len, encoded)):,} tokens; {len(heldout):,} held-out synsets")
    model = build_model(tokenizer, args.seed)
    log(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    result = train(model, training_batches(encoded, args.batch_size, args.seed), args, log)
    round_to_shipped(model)
    model.eval()
    if not args.no_save:  # the weights first: a failure in the measurements below must not lose the run
        save_weights(model, out_dir)
    test_rows = [row for row in heldout if row["split"] == "test"]
    result.update({
        "heldout_loss": round(heldout_loss(model, tokenizer, heldout), 4),
        "heldout_subset_loss": round(heldout_loss(model, tokenizer, test_rows[:SUBSET_SIZE]), 4),
        "corpus_tokens": sum(map(len, encoded)), "lines": len(lines), "heldout_synsets": len(heldout),
        "parameters": sum(p.numel() for p in model.parameters()),
        "total_seconds": round(time.perf_counter() - begin, 1), "settings": vars(args) | {"log": None},
    })
    log(json.dumps({k: v for k, v in result.items() if k != "settings"}))
    samples = sample_glosses(model, tokenizer, test_rows[:12])
    for prompt, text, truth in samples:
        log(f"{prompt} {text}   [true: {truth}]")
    if not args.no_save:
        atomic_write_text(out_dir / CARD_FILE, write_card(result, model.config, samples,
                                                             sequence_length=SEQUENCE_LENGTH,
                                                             subset_size=SUBSET_SIZE))
    return 0


if __name__ == "__main__":
    sys.exit(main())

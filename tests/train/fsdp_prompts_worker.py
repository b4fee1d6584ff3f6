"""Run by test_fsdp_prompts.py under `torchrun --nproc_per_node=2` with `TrainConfig(sharding="fsdp")`, and
in-process for the one-process reference: every registered method that acts on whole modules (layer kind
MODULE: prompt tuning, VPT, IAA's aside modules), with its paper defaults but for a short prompt, trains a
float64 transformers classifier it can adapt (prompt tuning and IAA a two-layer BERT, VPT a two-layer ViT; each
layer one FSDP unit, the embeddings, the prompt-tuning host and the head in the root unit) for 4 steps (two
micro-batches each) and writes its final checkpoint; rank 0 lists the trained parameters FSDP sharded in
OUT_DIR/<method>.sharded. A method whose run fails writes its one-line error to OUT_DIR/<method>.error instead
(the test then shows it).

    python -m torch.distributed.run --standalone --nproc_per_node=2 fsdp_prompts_worker.py OUT_DIR
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import deltatune as dt
from deltatune.train import TrainConfig, Trainer
from deltatune.train.distributed import World, setup_world
from deltatune.train.sharding import is_sharded_tensor

F64 = torch.float64
STEPS = 4
EXAMPLES = 16
CLASSES = 3
WIDTH = 16
TOKENS = 6  # sequence length of the text examples
PROMPT_TOKENS = 3  # short prompts: the sequences are 6 tokens / 4 patches long


class Classifier(nn.Module):
    """`backbone` (a transformers encoder) -> its first output token -> a linear `head`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(**inputs).last_hidden_state[:, 0])


def text_classifier() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return Classifier(BertModel(config, add_pooling_layer=False))


def image_classifier() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_channels=3)
    return Classifier(ViTModel(config, add_pooling_layer=False))


class TextDataset(Dataset):
    """Token ids with padded tails (masked out), labelled by their first token."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 30, (EXAMPLES, TOKENS), generator=generator)
        self.mask = torch.ones_like(self.ids)
        self.mask[::2, 4:] = 0
        self.labels = self.ids[:, 0] % CLASSES

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index], "labels": self.labels[index]}


class ImageDataset(Dataset):
    """3x8x8 images whose mean brightness is shifted by their class."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.arange(EXAMPLES) % CLASSES
        noise = torch.randn(EXAMPLES, 3, 8, 8, generator=generator, dtype=F64)
        self.pixels = noise + self.labels.to(F64).view(-1, 1, 1, 1)

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


@dataclass(frozen=True)
class Setup:
    """What one method trains on: the model it adapts, its data, its config beyond the paper defaults, and the
    pattern of its tensors hosted on whole modules (the ones this sweep is about)."""

    model: Callable[[], nn.Module]
    data: Callable[[], Dataset]
    options: dict[str, Any] = field(default_factory=dict)
    on_modules: str = r".*\.prompt"


# test_fsdp_prompts checks every method with layer kind MODULE is here. IAA also adapts Linear layers (the
# Linear sweep covers those); its aside modules wrap BERT's blocks.
SETUPS: dict[str, Setup] = {
    "prompt_tuning": Setup(text_classifier, TextDataset, {"num_tokens": PROMPT_TOKENS}),
    "vpt": Setup(image_classifier, ImageDataset, {"num_tokens": PROMPT_TOKENS}),
    "iaa": Setup(text_classifier, TextDataset, on_modules=r".*\.layer\.\d+\.deltas\..*"),
}
METHODS = list(SETUPS)


def adapted(method: str) -> tuple[nn.Module, dt.DeltaConfig]:
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    setup = SETUPS[method]
    config = dt.config_for(method, extra_trainable=("head",), **setup.options)
    return dt.adapt(setup.model().to(F64), config), config


def on_modules(method: str, names: list[str]) -> list[str]:
    """Of `names`, the tensors of `method`'s deltas hosted on whole modules."""
    return [name for name in names if re.fullmatch(SETUPS[method].on_modules, name)]


def train(method: str, out: Path, world: World) -> None:
    model, config = adapted(method)
    settings = TrainConfig(max_steps=STEPS, batch_size=8, grad_accum_steps=2, lr=0.05, log_every=1,
                           progress=False, sharding="fsdp", output_dir=str(out / method))
    trainer = Trainer(model, settings, SETUPS[method].data(), callbacks=config.training_callbacks(model, STEPS))
    trainer.train()
    if world.is_main:  # which trained tensors FSDP held as slices: the test checks the prompts were among them
        sharded = [name for name, p in trainer.model.named_parameters() if p.requires_grad and is_sharded_tensor(p)]
        (out / f"{method}.sharded").write_text("\n".join(sharded))


def run_all(out: Path) -> None:
    torch.set_num_threads(1)
    world = setup_world()
    for method in METHODS:
        try:
            train(method, out, world)
        except Exception as error:  # every process meets the same error: keep going to the next method
            if world.is_main:
                (out / f"{method}.error").write_text(f"{type(error).__name__}: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))

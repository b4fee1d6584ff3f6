"""The two pretrained glyph backbones, GlyphViT and GlyphCNN, and their offline loaders.

Both take `pixels` (B, 1, 16, 16) float32 in [0, 1] (white glyph on black) and return logits; both expose
`features(pixels) -> (B, D)`, the vector the head `classifier` reads. They were pretrained on the 62 source
glyph classes of the train fonts by `python -m deltatune.data.pretrain_vision` (model cards:
files/glyph-vit.md, files/glyph-cnn.md); the weights ship in files/ and load without network.

- GlyphViT: transformers' `ViTModel` (16x16 image, 4x4 patches -> 16 tokens + CLS, hidden 128, 4 layers,
  4 heads, MLP 512, no pooler) as `backbone`; the head reads the final-layer-norm CLS token (CLS pooling, as in
  ViT and VPT).
  In transformers 5 the attention projections are `backbone.layers.<i>.attention.q_proj / k_proj / v_proj /
  o_proj` and the MLP `backbone.layers.<i>.mlp.fc1 / fc2`.
- GlyphCNN: four conv3x3-BatchNorm-ReLU blocks (channels 32, 64, 64, 128; 2x2 max-pool after blocks 0
  and 2), global average pool, `classifier`. Its pooled 128-d vector (`features`) is also the feature space of
  the FID-style distance of the diffusion tasks. BatchNorm running statistics are the pretrained ones (buffers
  in the shipped file); a model in train mode updates them as usual.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.data.glyphs import FILES_DIR, SOURCE_CLASSES
from deltatune.data.models import ModelUnavailableError, _transformers
from deltatune.errors import ConfigError

VIT_WEIGHTS, VIT_CONFIG = "glyph-vit.safetensors", "glyph-vit.json"
CNN_WEIGHTS, CNN_CONFIG = "glyph-cnn.safetensors", "glyph-cnn.json"
VIT_SETTINGS = {
    "image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "intermediate_size": 512, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
CNN_CHANNELS = (32, 64, 64, 128)
CNN_POOL_AFTER = (0, 2)  # 16x16 -> 8x8 after block 0, -> 4x4 after block 2
# What a method adapts in GlyphViT unless told otherwise: the LoRA paper's Wq, Wv (transformers 5 names).
VIT_DEFAULT_TARGETS = ("q_proj", "v_proj")


class GlyphViT(nn.Module):
    """A small ViT (transformers' ViTModel as `backbone`) with a linear head `classifier` on the CLS token."""

    def __init__(self, num_classes: int = len(SOURCE_CLASSES), settings: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is invalid: expected an integer >= 2")
        transformers = _transformers()
        config = transformers.ViTConfig(**(settings or VIT_SETTINGS))
        self.backbone = transformers.ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The final-layer-norm CLS token (B, hidden)."""
        return self.backbone(pixel_values=pixels).last_hidden_state[:, 0]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixels))


class ConvBlock(nn.Module):
    """conv 3x3 -> BatchNorm -> ReLU. The conv keeps its bias (redundant before BatchNorm) so that an output-affine
    delta on it (SSF) can be merged: merging a shift needs a bias to fold into."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(hidden)))


class GlyphCNN(nn.Module):
    """Conv-BN-ReLU blocks (`blocks.<i>.conv`, `blocks.<i>.norm`), global average pool, linear `classifier`."""

    def __init__(self, num_classes: int = len(SOURCE_CLASSES), channels: tuple[int, ...] = CNN_CHANNELS,
                 pool_after: tuple[int, ...] = CNN_POOL_AFTER) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is invalid: expected an integer >= 2")
        widths = (1, *channels)
        self.blocks = nn.ModuleList(ConvBlock(widths[i], widths[i + 1]) for i in range(len(channels)))
        self.pool_after = tuple(pool_after)
        self.classifier = nn.Linear(channels[-1], num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The globally average-pooled last feature map (B, channels[-1])."""
        hidden = pixels
        for index, block in enumerate(self.blocks):
            hidden = block(hidden)
            if index in self.pool_after:
                hidden = nn.functional.max_pool2d(hidden, 2)
        return hidden.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(pixels))


def _read_weights(weights: str, config: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    path = FILES_DIR / weights
    if not path.is_file():
        raise ModelUnavailableError(
            f"pretrained weights not found at {path}: expected the packaged file; reinstall deltatune or "
            "pretrain them with `python -m deltatune.data.pretrain_vision`"
        )
    return load_file(str(path)), json.loads((FILES_DIR / config).read_text(encoding="utf-8"))


def _with_head(model: nn.Module, num_classes: int | None) -> nn.Module:
    """Replace the pretrained 62-way head by a fresh one (torch's global RNG) when another size is asked."""
    if num_classes is not None and num_classes != model.classifier.out_features:
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is invalid: expected an integer >= 2")
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


def load_glyph_vit(num_classes: int | None = None) -> GlyphViT:
    """The pretrained GlyphViT (train mode), its 62-way source head, or a fresh `num_classes`-way head."""
    state, config = _read_weights(VIT_WEIGHTS, VIT_CONFIG)
    model = GlyphViT(config["num_classes"], config["vit"])
    model.load_state_dict(state)
    return _with_head(model, num_classes)


def load_glyph_cnn(num_classes: int | None = None) -> GlyphCNN:
    """The pretrained GlyphCNN (train mode; pretrained BatchNorm statistics), with its head or a fresh one."""
    state, config = _read_weights(CNN_WEIGHTS, CNN_CONFIG)
    model = GlyphCNN(config["num_classes"], tuple(config["channels"]), tuple(config["pool_after"]))
    model.load_state_dict(state)
    return _with_head(model, num_classes)


def write_model_files(model: nn.Module, kind: str, out_dir: Path) -> tuple[Path, Path]:
    """Save the weights (float32 safetensors) and the config json that `load_glyph_<kind>` reads."""
    from safetensors.torch import save_file

    if kind == "vit":
        weights, config_name = VIT_WEIGHTS, VIT_CONFIG
        config = {"num_classes": model.classifier.out_features, "pooling": "cls", "vit": VIT_SETTINGS}
    else:
        weights, config_name = CNN_WEIGHTS, CNN_CONFIG
        config = {"num_classes": model.classifier.out_features, "channels": list(CNN_CHANNELS),
                  "pool_after": list(CNN_POOL_AFTER)}
    config["classes"] = "".join(SOURCE_CLASSES)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / weights))
    (out_dir / config_name).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return out_dir / weights, out_dir / config_name

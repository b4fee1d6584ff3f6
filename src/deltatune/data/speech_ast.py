"""SpeechAST: a small audio spectrogram transformer pretrained here on spoken keywords, and its offline loader.

AST-style (Gong et al. 2021): the log-mel spectrogram (B, 1, 64 mel bins, 80 frames; deltatune.data.speech) is an
image cut into 8x8 patches (8 x 10 = 80 tokens) by a patch-embedding convolution, a CLS token is prepended,
learned position embeddings added, and pre-LN transformer blocks follow. It is GlyphViT's design on another input:
transformers' `ViTModel` (hidden 128, 4 layers, 4 heads, MLP 512, no dropout, no pooler) as `backbone`, the head
`classifier` on the final-layer-norm CLS token, so every method that runs on GlyphViT finds the same module names
here: `backbone.layers.<i>.attention.q_proj / k_proj / v_proj / o_proj`, `backbone.layers.<i>.mlp.fc1 / fc2`.
(AST itself uses overlapping 16x16 patches on 128 bins and a distillation token; at this size non-overlapping 8x8
patches keep the sequence short.) Pretrained by `python -m deltatune.data.pretrain_speech` on the 25 pretraining
keywords (card: files/speech-ast.md); the weights ship in files/.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from deltatune.data.glyphs import FILES_DIR
from deltatune.data.models import ModelUnavailableError, _transformers
from deltatune.data.speech import FRAMES, MEL_BINS, PRETRAIN_WORDS
from deltatune.errors import ConfigError

AST_WEIGHTS, AST_CONFIG = "speech-ast.safetensors", "speech-ast.json"
AST_SETTINGS = {
    "image_size": [MEL_BINS, FRAMES], "patch_size": 8, "num_channels": 1, "hidden_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
AST_DEFAULT_TARGETS = ("q_proj", "v_proj")  # the LoRA paper's Wq, Wv, as on GlyphViT


class SpeechAST(nn.Module):
    """ViTModel over log-mel spectrograms (`backbone`) with a linear head `classifier` on the CLS token.

    Input `spectrogram` (B, 1, 64, 80) float32 (standardized log-mel); output logits."""

    def __init__(self, num_classes: int = len(PRETRAIN_WORDS), settings: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is invalid: expected an integer >= 2")
        config = _transformers().ViTConfig(**(settings or AST_SETTINGS))
        self.backbone = _transformers().ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, num_classes)

    def features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """The final-layer-norm CLS token (B, hidden)."""
        return self.backbone(pixel_values=spectrogram).last_hidden_state[:, 0]

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(spectrogram))


def load_speech_ast(num_classes: int | None = None) -> SpeechAST:
    """The pretrained SpeechAST (train mode) with its 25-way keyword head, or a fresh `num_classes`-way head
    (torch's global RNG)."""
    from safetensors.torch import load_file

    path = FILES_DIR / AST_WEIGHTS
    if not path.is_file():
        raise ModelUnavailableError(f"pretrained weights not found at {path}: expected the packaged file; reinstall "
                                    "deltatune or pretrain them with `python -m deltatune.data.pretrain_speech`")
    config = json.loads((FILES_DIR / AST_CONFIG).read_text(encoding="utf-8"))
    model = SpeechAST(config["num_classes"], config["vit"])
    model.load_state_dict({name: tensor.float() for name, tensor in load_file(str(path)).items()})
    if num_classes is not None and num_classes != model.classifier.out_features:
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes} is invalid: expected an integer >= 2")
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


def write_speech_ast(model: SpeechAST, out_dir) -> None:
    """Save the weights (float32 safetensors) and the config json that `load_speech_ast` reads."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / AST_WEIGHTS))
    config = {"num_classes": model.classifier.out_features, "pooling": "cls", "vit": AST_SETTINGS,
              "classes": list(PRETRAIN_WORDS), "input": "spectrogram (B, 1, 64, 80): deltatune.data.speech"}
    (out_dir / AST_CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")

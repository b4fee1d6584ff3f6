"""Small float64 models, one per layer kind, for the shared delta contract."""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class ConvNet(nn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.first = conv(3, 18, 3, padding=1)
        self.second = conv(18, 20, 1)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class DenseNet(nn.Module):
    def __init__(self, layer=nn.Linear) -> None:
        super().__init__()
        self.first = layer(20, 24)
        self.second = layer(24, 18)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class HFConvNet(DenseNet):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.first = Conv1D(24, 20)  # transformers' Conv1D(nf=out, nx=in)
        self.second = Conv1D(18, 24)


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Embedding(30, 20)
        self.second = nn.Embedding(30, 20)

    def forward(self, x):
        return torch.tanh(self.first(x)) + self.second(x)


class NormNet(nn.Module):
    """Two norms of one kind with a mixing layer between them (so the second norm sees the first's output
    through something other than itself); only `first` and `second` are norms."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "layer_norm":
            self.first, self.mix, self.second = nn.LayerNorm(12), nn.Linear(12, 12), nn.LayerNorm(12)
        elif kind == "batch_norm":
            self.first, self.mix, self.second = nn.BatchNorm2d(6), nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        else:
            self.first, self.mix, self.second = nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.second(self.mix(torch.tanh(self.first(x))))


def _norm_statistics(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """BatchNorm running statistics away from (0, 1), evaluated with them (eval mode): the inference fold."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def build(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A float64 toy model whose targetable layers are all of `kind`, and an input batch."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "linear":
        model, x = DenseNet(), torch.randn(5, 20, generator=generator)
    elif kind == "conv1d_hf":
        model, x = HFConvNet(), torch.randn(5, 20, generator=generator)
    elif kind == "conv":
        model, x = ConvNet(2), torch.randn(2, 3, 6, 6, generator=generator)
    elif kind == "conv1d":
        model, x = ConvNet(1), torch.randn(2, 3, 9, generator=generator)
    elif kind == "embedding":
        model, x = EmbeddingNet(), torch.randint(0, 30, (4, 7), generator=generator)
    elif kind == "layer_norm":
        model, x = NormNet(kind), torch.randn(3, 5, 12, generator=generator)
    elif kind == "batch_norm":
        model, x = NormNet(kind), torch.randn(3, 6, 4, 4, generator=generator)
    elif kind == "batch_norm1d":
        model, x = NormNet(kind), torch.randn(6, 8, generator=generator)
    else:
        raise ValueError(kind)
    for parameter in model.parameters():  # transformers' Conv1D starts with zero bias: make every tensor count
        with torch.no_grad():
            parameter.normal_(0, 0.3, generator=generator)
    if isinstance(model, NormNet):
        with torch.no_grad():
            _norm_statistics(model, generator)
    model = model.double()
    return model, (x.double() if x.is_floating_point() else x)


LAYER_CASES = {"linear": "linear", "conv1d_hf": "conv1d_hf", "conv": "conv", "conv1d": "conv", "embedding": "embedding",
               "layer_norm": "layer_norm", "batch_norm": "batch_norm", "batch_norm1d": "batch_norm"}


# --- real model shapes that once failed (issue 9): a ViT patch conv, GPT-2's tied head, a ResNet's BatchNorm ---
def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()


def tiny_vit(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """transformers ViT, float64, eval; its patch embedding is the Conv2d `embeddings.patch_embeddings.projection`."""
    from transformers import ViTConfig, ViTModel

    _quiet_transformers()
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_channels=3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ViTModel(config).double().eval(), x


def tiny_gpt2(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """transformers GPT-2 LM, float64, eval; `lm_head.weight` is `transformer.wte.weight` (tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(seed))
    return GPT2LMHeadModel(config).double().eval(), ids


def tiny_resnet(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """transformers ResNet classifier with BatchNorm2d after every (bias-free) conv, float64; every conv has
    min(fan_in, out) >= 12, above the default ranks."""
    from transformers import ResNetConfig, ResNetForImageClassification

    _quiet_transformers()
    torch.manual_seed(seed)
    config = ResNetConfig(num_channels=3, embedding_size=12, hidden_sizes=[12, 16], depths=[1, 1],
                          layer_type="basic", num_labels=3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ResNetForImageClassification(config).double(), x


def output_of(output) -> torch.Tensor:
    """The main tensor of a transformers output (or a plain tensor)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(output, name):
            return getattr(output, name)
    return output


# --- causal LM through the Trainer (issue 9, training part) -----------------------------------------------------
# Kept at the end of the file, apart from the layer-kind models above, so rows added in parallel merge cleanly.

LM_VOCAB, LM_LENGTH = 40, 8


def tiny_causal_lm(seed: int = 0) -> nn.Module:
    """A float64 transformers Llama causal LM (2 layers, hidden 16, biases, untied head): its forward takes `labels` and
    returns `.loss` (next-token cross-entropy, shifted inside the model, -100 ignored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=LM_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2 * LM_LENGTH,
                         tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).double()


class TokenDataset(torch.utils.data.Dataset):
    """Counting sequences (start, start + step, ...) mod the vocabulary: learnable next tokens. Items are
    {"input_ids", "attention_mask", "labels"} with labels = input_ids (transformers' causal-LM convention); the
    last `padded` positions of every other item are padding (labels -100, attention 0)."""

    def __init__(self, n: int = 16, seed: int = 0, padded: int = 2) -> None:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, LM_VOCAB, (n, 1), generator=generator)
        steps = torch.randint(1, 4, (n, 1), generator=generator)
        self.input_ids = (starts + steps * torch.arange(LM_LENGTH)) % LM_VOCAB
        self.attention_mask = torch.ones_like(self.input_ids)
        self.attention_mask[1::2, LM_LENGTH - padded:] = 0
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}

    def batches(self, size: int) -> list[dict[str, torch.Tensor]]:
        """The dataset as collated dict batches (for a method's planning stage)."""
        return [torch.utils.data.default_collate([self[i] for i in range(start, min(start + size, len(self)))])
                for start in range(0, len(self), size)]

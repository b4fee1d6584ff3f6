"""How good a GlyphDiffusion's samples are: FD-CNN, a frozen classifier's accuracy, base-domain degradation.

- `sample_like(model, labels, ...)`: one generated image per label, seeded (the real set's class mix).
- `generation_report(model, real, judge)`: {"fd_cnn", "judge_accuracy"} of samples of the real set's labels
  against the real images; FD-CNN in the pretrained GlyphCNN's features (deltatune.data.frechet).
- `glyph_degradation(model)`: the same on the base domain, the 62 glyph classes of the test fonts, with the
  GlyphCNN itself as the judge; measured before and after an adaptation, it says how much of the base model's
  generation the adaptation kept (the property SaRA claims).
- `DigitJudge` / `load_digit_judge()`: the frozen judge of handwritten digits (16x16), files/digit-judge.*.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.data.frechet import default_feature_network, fd_cnn
from deltatune.errors import DeltatuneError

FILES = Path(__file__).parent / "files"
JUDGE_FILE = "digit-judge.safetensors"
SAMPLE_SEED = 0
SAMPLE_STEPS = 10
MIN_SAMPLES = 500


class DigitJudge(nn.Module):
    """A small CNN for (B, 1, 16, 16) digits: conv(1->16) -> ReLU -> pool -> conv(16->32) -> ReLU -> pool ->
    flatten (32*4*4) -> `classifier` (10). About 10k parameters; the frozen judge of generated digits."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(channels[1] * 4 * 4, num_classes)

    def forward(self, pixels: Tensor) -> Tensor:
        hidden = self.pool(torch.relu(self.conv1(pixels)))
        hidden = self.pool(torch.relu(self.conv2(hidden)))
        return self.classifier(hidden.flatten(1))


@functools.lru_cache(maxsize=1)
def _judge_tensors() -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = FILES / JUDGE_FILE
    if not path.is_file():
        raise DeltatuneError(f"the digit judge {path} is missing; reinstall deltatune, or rebuild it with "
                             "`python -m deltatune.data.train_digit_judge`")
    return load_file(str(path))


def load_digit_judge() -> DigitJudge:
    """The frozen handwritten-digit judge (eval mode, no gradients), from files/digit-judge.safetensors."""
    judge = DigitJudge()
    judge.load_state_dict({key: value.float() for key, value in _judge_tensors().items()})
    return judge.eval().requires_grad_(False)


def load_feature_network() -> nn.Module:
    """The frozen pretrained GlyphCNN (features(pixels) -> (B, D)) whose features define FD-CNN."""
    return default_feature_network()


def sample_like(model: nn.Module, labels: Tensor, min_samples: int = MIN_SAMPLES, steps: int = SAMPLE_STEPS,
                seed: int = SAMPLE_SEED, guidance_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(images, labels): `labels` cycled to max(min_samples, len(labels)) labels, one sample each, the starting
    noise from `torch.Generator().manual_seed(seed)`: (about) the real set's class mix, reproducibly."""
    count = max(min_samples, len(labels))
    wanted = labels.repeat(-(-count // max(1, len(labels))))[:count]
    generator = torch.Generator().manual_seed(seed)
    return model.sample(wanted, steps=steps, generator=generator, guidance_scale=guidance_scale), wanted


@torch.no_grad()
def class_accuracy(classifier: Callable[[Tensor], Tensor], pixels: Tensor, labels: Tensor,
                   batch_size: int = 512) -> float:
    """Share of `pixels` the frozen classifier puts in their `labels` class."""
    device = next(classifier.parameters()).device if isinstance(classifier, nn.Module) else None
    correct = 0
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start:start + batch_size]
        logits = classifier(chunk.to(device) if device else chunk)
        correct += int((logits.argmax(dim=-1).cpu() == labels[start:start + batch_size]).sum())
    return correct / max(1, len(pixels))


def generation_report(model: nn.Module, real_pixels: Tensor, real_labels: Tensor,
                      judge: Callable[[Tensor], Tensor] | None, feature_network: nn.Module | None = None,
                      **sampling: object) -> dict[str, float]:
    """{"fd_cnn": FD-CNN of samples vs the real images, "judge_accuracy": the judge's accuracy on the samples}
    (the latter only with a judge); `sampling` goes to `sample_like` (min_samples, steps, seed, guidance)."""
    images, labels = sample_like(model, real_labels, **sampling)
    report = {"fd_cnn": fd_cnn(images, real_pixels, feature_network or load_feature_network())}
    if judge is not None:
        report["judge_accuracy"] = class_accuracy(judge, images, labels)
    return report


def glyph_test_set() -> tuple[Tensor, Tensor]:
    """The plain renderings of the 62 source classes in the test fonts (the base domain's held-out images)."""
    from deltatune.data.glyphs import glyph_subset, read_glyphs

    return glyph_subset(read_glyphs(), "test", variants=(0,))


def glyph_degradation(model: nn.Module, **sampling: object) -> dict[str, float]:
    """Base-domain generation quality: {"fd_cnn", "judge_accuracy"} of glyphs generated for the test fonts'
    labels (one per real image) against the real test-font glyphs, the GlyphCNN as feature network and judge."""
    network = load_feature_network()
    pixels, labels = glyph_test_set()
    sampling.setdefault("min_samples", len(labels))
    return generation_report(model, pixels, labels, judge=network, feature_network=network, **sampling)

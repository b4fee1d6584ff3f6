"""BlackVIP: an input-dependent visual prompt from a small coordinator, trained by SPSA-GC against a black box
(Oh et al., CVPR 2023; official code changdaeoh/BlackVIP `trainers/visual_prompters.py`, `trainers/blackvip.py`;
our reading: /work/shared/methods/other.md §8).

    box = BlackBox(target_model, output="probabilities")
    coordinator = Coordinator(FrozenEncoder(load_glyph_cnn(), "features"), CoordinatorConfig(feature_dim=128))
    optimizer = SPSAGC(coordinator.decoder.parameters(), seed=0)
    result = train_blackvip(coordinator, box, shuffled_batches(pixels, labels, 32, seed=0), optimizer, steps=500)
    accuracy = evaluate(box, pixels_test, labels_test, coordinator)

The prompted image is x̃ = clip(x + ε · dec(z(x)))  (clipped to the pixel range), where
- z = a frozen encoder's feature vector of x (the paper: a pretrained MAE ViT-B's last CLS token; here any
  module mapping images to (B, D), wrapped in `FrozenEncoder` so it stays in eval mode and out of the optimizer);
- dec = the trainable decoder: z concatenated with a learned "prompt trigger" vector (the paper's `p_trigger`,
  init U(0, 0.1)), reshaped to a (C0, s, s) map, then ×2 up-sampling stages (depthwise ConvTranspose2d k2 s2 +
  pointwise ConvTranspose2d, BatchNorm, GELU; the last stage a plain ConvTranspose2d to the image channels),
  scaled down from the paper's 7×7 → 224×224 (five stages) to the image here (2×2 → 16×16: three stages).

Training queries the black box only: SPSA-GC (deltatune.optim.spsa_gc) perturbs the decoder's flat parameters,
reads the loss of the black box's outputs at w ± c_k Δ on the same batch (2·S queries per example per step) and
steps along the corrected estimate. The loss is cross-entropy of the output distribution, as the paper. The
decoder stays in train mode (BatchNorm on batch statistics, its running statistics moving) during the queries,
as the official trainer; evaluation uses eval mode. The encoder's features are computed once per step (it is
frozen and deterministic, so the 2·S queries would recompute the same z).

Not a registered delta: a registered INPUT delta is hosted inside the model and is handed the module it wraps,
while BlackVIP's whole point is that the target is reached through its outputs only (BlackBox). Not mergeable.
Saved files (`save_coordinator`): coordinator.safetensors (the decoder's parameters and BatchNorm buffers) and
coordinator.json (format, version, CoordinatorConfig); the encoder is the caller's, passed again to load.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.core.atomic import atomic_write_bytes, atomic_write_text
from deltatune.errors import AdapterFileError, ConfigError, TrainingError, config_check
from deltatune.optim.spsa_gc import SPSAGC
from deltatune.train.black_box import BlackBox

FORMAT, VERSION = "deltatune-blackvip-coordinator", 1
WEIGHTS, CONFIG = "coordinator.safetensors", "coordinator.json"


@dataclass(frozen=True)
class CoordinatorConfig:
    """The decoder's shape and the prompt's scale.

    Args:
        feature_dim: D, the width of the encoder's feature vector.
        image_shape: (channels, height, width) of the images (square, height = start_size · 2^stages).
        source_dim: D + the trigger's length; a multiple of start_size² (the paper: 1568 = 32·7², trigger 800).
        start_size: side of the first map (the paper: 7).
        widths: channels after each up-sampling stage but the last (the paper: 64, 32, 32, 16).
        epsilon: the prompt's scale ε (the paper's P_EPS, 1.0 by default, 0.2-1 per dataset).
        pixel_range: the range prompted images are clipped to (the paper: CLIP's normalized range).
        trigger_init: the trigger starts U(0, trigger_init) (the paper: 0.1).
    """

    feature_dim: int
    image_shape: tuple[int, int, int] = (1, 16, 16)
    source_dim: int = 256
    start_size: int = 2
    widths: tuple[int, ...] = (32, 16)
    epsilon: float = 1.0
    pixel_range: tuple[float, float] = (0.0, 1.0)
    trigger_init: float = 0.1

    def __post_init__(self) -> None:
        config_check(self.feature_dim >= 1, "feature_dim", self.feature_dim, "the encoder's output width >= 1")
        config_check(self.source_dim > self.feature_dim and self.source_dim % self.start_size**2 == 0, "source_dim",
                     self.source_dim, f"a multiple of start_size² = {self.start_size ** 2} above feature_dim")
        channels, height, width = self.image_shape
        ratio = height / self.start_size
        stages = round(math.log2(ratio)) if ratio >= 2 else 0
        config_check(height == width and stages >= 1 and self.start_size * 2**stages == height, "image_shape",
                     self.image_shape, f"square images whose side is start_size ({self.start_size}) times a power of 2")
        config_check(len(self.widths) == stages - 1, "widths", self.widths,
                     f"{stages - 1} channel counts (one per up-sampling stage but the last)")
        config_check(self.epsilon > 0, "epsilon", self.epsilon, "a prompt scale > 0 (BlackVIP: 0.2 to 1)")
        low, high = self.pixel_range
        config_check(low < high, "pixel_range", self.pixel_range, "(low, high) with low < high")


class FrozenEncoder(nn.Module):
    """A fixed feature extractor: `module.<method>(x)` (or `module(x)`) in eval mode, no gradient, never trained."""

    def __init__(self, module: nn.Module, method: str | None = None) -> None:
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.method = method

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)  # frozen: BatchNorm statistics and dropout stay as pretrained

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        features = getattr(self.module, self.method)(x) if self.method else self.module(x)
        return features.flatten(1)


def _up_stage(channels_in: int, channels_out: int) -> list[nn.Module]:
    """One ×2 up-sampling stage as the paper's decoder: depthwise k2 s2, pointwise 1x1 (no bias), BN, GELU."""
    return [nn.ConvTranspose2d(channels_in, channels_in, 2, 2, groups=channels_in),
            nn.ConvTranspose2d(channels_in, channels_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels_out), nn.GELU()]


class PromptDecoder(nn.Module):
    """The trainable part: [z; trigger] -> (C0, s, s) -> ×2 stages -> (channels, height, width)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__()
        self.config = config
        self.trigger = nn.Parameter(torch.empty(1, config.source_dim - config.feature_dim))
        nn.init.uniform_(self.trigger, 0.0, config.trigger_init)
        first = config.source_dim // config.start_size**2
        widths = (first, *config.widths)
        stages = [module for i in range(len(widths) - 1) for module in _up_stage(widths[i], widths[i + 1])]
        stages.append(nn.ConvTranspose2d(widths[-1], config.image_shape[0], 2, 2, bias=False))
        self.body = nn.Sequential(*stages)

    def forward(self, features: Tensor) -> Tensor:
        batch, size = features.shape[0], self.config.start_size
        source = torch.cat([features, self.trigger.expand(batch, -1)], dim=1)
        return self.body(source.reshape(batch, -1, size, size))


class Coordinator(nn.Module):
    """BlackVIP's prompt generator: a frozen encoder and a trainable decoder (only `decoder` is optimized)."""

    def __init__(self, encoder: nn.Module, config: CoordinatorConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder)
        self.decoder = PromptDecoder(config)

    def features(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        if features.shape[1] != self.config.feature_dim:
            raise ConfigError(f"the encoder gives {features.shape[1]} features, the coordinator expects "
                              f"{self.config.feature_dim}: set CoordinatorConfig(feature_dim={features.shape[1]})")
        return features

    def prompt_images(self, x: Tensor, features: Tensor | None = None) -> Tensor:
        """x̃ = clip(x + ε · dec(z(x))); pass `features` = z(x) to reuse them."""
        features = self.features(x) if features is None else features
        low, high = self.config.pixel_range
        return (x + self.config.epsilon * self.decoder(features)).clamp(low, high)

    def forward(self, x: Tensor) -> Tensor:
        return self.prompt_images(x)


# --- losses, data, training, evaluation ------------------------------------------------------------------------
def output_loss(outputs: Tensor, labels: Tensor, output: str) -> Tensor:
    """Cross-entropy of a black box's outputs: logits, or a probability distribution (−log p_y)."""
    if output == "probabilities":
        return nn.functional.nll_loss(outputs.clamp_min(1e-12).log(), labels)
    return nn.functional.cross_entropy(outputs, labels)


def shuffled_batches(pixels: Tensor, labels: Tensor, batch_size: int, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless epochs of seeded shuffled batches (the last partial batch of an epoch is dropped when possible)."""
    config_check(batch_size >= 1, "batch_size", batch_size, "an integer >= 1")
    generator = torch.Generator().manual_seed(seed)
    count = pixels.shape[0]
    size = min(batch_size, count)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - size + 1, size):
            index = order[start:start + size]
            yield pixels[index], labels[index]


@dataclass
class BlackVIPResult:
    """What a BlackVIP training run did: steps, the queries it spent, the mean loss of each step, seconds."""

    steps: int = 0
    queries: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _batch_loss(coordinator: Coordinator, box: BlackBox, pixels: Tensor, labels: Tensor) -> Callable[[], Tensor]:
    """The closure SPSA-GC calls 2·S times: the black box's loss on this batch at the decoder's current values."""
    features = coordinator.features(pixels)  # frozen encoder: the same z for all 2·S queries of the step

    def loss() -> Tensor:
        return output_loss(box(coordinator.prompt_images(pixels, features)), labels, box.output)

    return loss


def train_blackvip(coordinator: Coordinator, box: BlackBox, batches: Iterator[tuple[Tensor, Tensor]],
                   optimizer: SPSAGC, steps: int, on_step: Callable[[int, BlackVIPResult], None] | None = None,
                   ) -> BlackVIPResult:
    """`steps` SPSA-GC steps of the coordinator's decoder against `box`; `on_step(step, result)` after each."""
    if not isinstance(optimizer, SPSAGC):
        raise TrainingError("train_blackvip needs a zeroth-order optimizer (deltatune.optim.spsa_gc.SPSAGC): a "
                            "black box gives no gradient")
    result, started, spent = BlackVIPResult(), time.perf_counter(), box.queries
    coordinator.train()
    for step in range(1, steps + 1):
        pixels, labels = next(batches)
        value = float(optimizer.step(_batch_loss(coordinator, box, pixels, labels)))
        if not math.isfinite(value):
            raise TrainingError(f"BlackVIP step {step}: the loss is {value}; lower the SPSA gains a or c")
        result.losses.append(value)
        result.steps, result.queries = step, box.queries - spent
        result.seconds = time.perf_counter() - started
        if on_step is not None:
            on_step(step, result)
    coordinator.eval()
    return result


@torch.no_grad()
def evaluate(box: BlackBox, pixels: Tensor, labels: Tensor, coordinator: Coordinator | None = None,
             batch_size: int = 256) -> float:
    """Accuracy of the black box on (prompted, when a coordinator is given) images; the coordinator in eval mode."""
    if coordinator is not None:
        coordinator.eval()
    correct = 0
    for start in range(0, pixels.shape[0], batch_size):
        chunk = pixels[start:start + batch_size]
        inputs = coordinator.prompt_images(chunk) if coordinator is not None else chunk
        correct += int((box(inputs).argmax(dim=-1) == labels[start:start + batch_size]).sum())
    return correct / max(1, pixels.shape[0])


# --- files ---------------------------------------------------------------------------------------------------
def save_coordinator(coordinator: Coordinator, folder: str | Path) -> Path:
    """Write the decoder (coordinator.safetensors) and its config (coordinator.json) into `folder`."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in coordinator.decoder.state_dict().items()}
    atomic_write_bytes(folder / WEIGHTS, save(state))
    config = asdict(coordinator.config)
    atomic_write_text(folder / CONFIG, json.dumps({"format": FORMAT, "version": VERSION, "config": config}, indent=1))
    return folder


def load_coordinator(folder: str | Path, encoder: nn.Module) -> Coordinator:
    """The coordinator saved in `folder`, with `encoder` (the same frozen encoder it was trained with)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise AdapterFileError(f"{folder} holds no BlackVIP coordinator ({WEIGHTS} and {CONFIG}); pass the folder "
                               "save_coordinator wrote")
    saved = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if saved.get("format") != FORMAT or saved.get("version", 0) > VERSION:
        raise AdapterFileError(f"{folder / CONFIG} is not a BlackVIP coordinator of version <= {VERSION}; "
                               "re-save it with this deltatune")
    fields = saved["config"]
    config = CoordinatorConfig(**{**fields, "image_shape": tuple(fields["image_shape"]),
                                  "widths": tuple(fields["widths"]), "pixel_range": tuple(fields["pixel_range"])})
    coordinator = Coordinator(encoder, config)
    coordinator.decoder.load_state_dict(load_file(str(folder / WEIGHTS)))
    return coordinator.eval()

"""`GlyphDiffusion`: a small class-conditional DDPM for 16x16 grayscale images (diffusers' UNet2DModel).

    from deltatune.data import load_glyph_ddpm
    model = load_glyph_ddpm()                                 # pretrained on the glyph source fonts, offline
    out = model(pixels, labels)                               # out.loss: the epsilon-prediction MSE (training)
    images = model.sample(torch.arange(10), steps=10, generator=torch.Generator().manual_seed(0))   # [0, 1]

Training (`forward`): pixels in [0, 1] are mapped to [-1, 1]; a timestep t ~ U{0..999} and a noise eps ~ N(0, I)
are drawn from torch's global RNG (the trainer seeds it, as it seeds dropout); the UNet predicts eps from
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (diffusers' DDPMScheduler.add_noise) and the loss is the mean
squared error (Ho et al. 2020, eq. 14, the "simple" loss). Noise schedule: 1,000 steps, the cosine schedule of
Nichol & Dhariwal 2021 (diffusers' "squaredcos_cap_v2", betas capped at 0.999), chosen over the linear one
because at 16x16 the linear schedule destroys the image long before t = 1000, wasting most timesteps.

Conditioning: `labels` are class ids (0..61 for the glyphs '0'-'9', 'A'-'Z', 'a'-'z'; the handwritten digits
reuse ids 0-9). Class id 62 is the "null" class of classifier-free guidance (Ho & Salimans 2022): in training mode
each label is replaced by it with probability `label_dropout` (global RNG, drawn after t and eps), so that
`sample(..., guidance_scale=w)` can extrapolate eps_null + w (eps_class - eps_null); w = 1 is plain conditional
sampling and costs one UNet call per step instead of two.

Sampling (`sample`): DPM-Solver++ (2nd order, multistep; diffusers' DPMSolverMultistepScheduler built from the
training schedule's config) in `steps` steps from x_T ~ N(0, I) drawn with `generator`: deterministic given the
generator (the solver itself draws no noise). Output clamped to [0, 1].

Module paths (targeting): the UNet is the attribute `unet`; its attention layers are
`unet.{down_blocks.1,mid_block,up_blocks.1}.attentions.N.{to_q,to_k,to_v,to_out.0}` (nn.Linear) and its
convolutions `...resnets.N.conv1/conv2`, `conv_in`, `conv_out`, ... (nn.Conv2d).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, DeltatuneError, config_check

NUM_GLYPH_CLASSES = 62
NULL_CLASS = NUM_GLYPH_CLASSES  # the classifier-free-guidance "no class" id
FILES = Path(__file__).parent / "files"
WEIGHTS_FILE, CONFIG_FILE = "glyph-ddpm.safetensors", "glyph-ddpm.json"


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        from deltatune.data.models import ModelUnavailableError

        raise ModelUnavailableError(
            "the diffusion backbone needs diffusers, which is not installed; "
            "install it with `pip install 'deltatune[diffusion]'`"
        ) from None
    return diffusers


@dataclass(frozen=True)
class GlyphDiffusionConfig:
    """The architecture and noise schedule of a GlyphDiffusion (saved as JSON next to its weights)."""

    sample_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    # An attention block at 8x8 (the second level) and in the 4x4 middle; none at full resolution (cost).
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    norm_num_groups: int = 8
    attention_head_dim: int = 32
    num_classes: int = NUM_GLYPH_CLASSES
    label_dropout: float = 0.1
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the recipe), saved with the config

    def __post_init__(self) -> None:
        config_check(self.sample_size >= 4, "sample_size", self.sample_size, "an integer >= 4")
        config_check(len(self.block_out_channels) == len(self.down_block_types) == len(self.up_block_types),
                     "block_out_channels", self.block_out_channels, "one width per down and per up block")
        config_check(0.0 <= self.label_dropout < 1.0, "label_dropout", self.label_dropout, "a float in [0, 1)")
        config_check(self.num_classes >= 1, "num_classes", self.num_classes, "an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GlyphDiffusionConfig:
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known)


@dataclass
class DenoisingOutput:
    """What `GlyphDiffusion.forward` returns: `.loss` (the batch-mean epsilon MSE) and the tensors behind it."""

    loss: Tensor
    predicted_noise: Tensor
    noise: Tensor
    timesteps: Tensor


class GlyphDiffusion(nn.Module):
    """A class-conditional DDPM: `unet` (diffusers UNet2DModel, 1 channel in and out) plus its noise schedule.

    See the module docstring for the training objective, the conditioning and the sampler."""

    def __init__(self, config: GlyphDiffusionConfig | None = None) -> None:
        super().__init__()
        self.config = config or GlyphDiffusionConfig()
        diffusers = _diffusers()
        self.unet = diffusers.UNet2DModel(
            sample_size=self.config.sample_size, in_channels=1, out_channels=1,
            block_out_channels=self.config.block_out_channels, layers_per_block=self.config.layers_per_block,
            down_block_types=self.config.down_block_types, up_block_types=self.config.up_block_types,
            norm_num_groups=self.config.norm_num_groups, attention_head_dim=self.config.attention_head_dim,
            num_class_embeds=self.config.num_classes + 1,  # + the null class
        )
        self.noise_scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=self.config.train_timesteps, beta_schedule=self.config.beta_schedule,
            prediction_type="epsilon",
        )

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, pixels: Tensor, labels: Tensor) -> DenoisingOutput:
        """The denoising loss of a batch at a random timestep and noise (torch's global RNG; see module doc)."""
        clean = pixels * 2.0 - 1.0
        timesteps = torch.randint(0, self.config.train_timesteps, (clean.shape[0],), device=clean.device)
        noise = torch.randn_like(clean)
        if self.training and self.config.label_dropout > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.config.label_dropout
            labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        return self.denoising_loss(pixels, labels, timesteps, noise)

    def denoising_loss(self, pixels: Tensor, labels: Tensor, timesteps: Tensor, noise: Tensor) -> DenoisingOutput:
        """The epsilon-prediction MSE at given timesteps and noise (deterministic: no random draw)."""
        self._check_labels(labels)
        clean = pixels * 2.0 - 1.0
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        predicted = self.unet(noisy, timesteps, class_labels=labels).sample
        loss = torch.mean((predicted.float() - noise.float()) ** 2)
        return DenoisingOutput(loss=loss, predicted_noise=predicted, noise=noise, timesteps=timesteps)

    def _check_labels(self, labels: Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_class):
            raise ConfigError(f"labels range {int(labels.min())}..{int(labels.max())} is invalid: expected class "
                              f"ids 0..{self.null_class - 1} (or {self.null_class}, the null class)")

    def predict_noise(self, noisy: Tensor, timestep: Tensor, labels: Tensor, guidance_scale: float) -> Tensor:
        """eps(x_t, t, class), with classifier-free guidance when guidance_scale != 1."""
        times = timestep.expand(noisy.shape[0]).to(noisy.device)
        if guidance_scale == 1.0:
            return self.unet(noisy, times, class_labels=labels).sample
        null = torch.full_like(labels, self.null_class)
        both = self.unet(torch.cat([noisy, noisy]), torch.cat([times, times]),
                         class_labels=torch.cat([labels, null])).sample
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def sample(self, labels: Tensor, steps: int = 10, generator: torch.Generator | None = None,
               guidance_scale: float = 1.0, batch_size: int = 256, noise: Tensor | None = None) -> Tensor:
        """Images (N, 1, S, S) in [0, 1] of the classes `labels` (N,), by DPM-Solver++ in `steps` steps; the
        starting noise x_T is `noise` (N, 1, S, S) when given, else drawn from `generator` (on the CPU, so results
        do not depend on the device)."""
        config_check(steps >= 1, "steps", steps, "an integer >= 1")
        labels = torch.as_tensor(labels, dtype=torch.long)
        self._check_labels(labels)
        size = self.config.sample_size
        if noise is None:
            noise = torch.randn((len(labels), 1, size, size), generator=generator, dtype=torch.float32)
        elif tuple(noise.shape) != (len(labels), 1, size, size):
            raise ConfigError(f"noise of shape {tuple(noise.shape)} is invalid: expected {(len(labels), 1, size, size)}"
                              " (one starting image per label)")
        was_training = self.training
        self.eval()
        try:
            chunks = [self._solve(noise[i:i + batch_size], labels[i:i + batch_size], steps, guidance_scale)
                      for i in range(0, len(labels), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else noise

    def _solve(self, noise: Tensor, labels: Tensor, steps: int, guidance_scale: float) -> Tensor:
        solver = _diffusers().DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)
        solver.set_timesteps(steps)
        parameter = next(self.unet.parameters())
        sample = noise.to(device=parameter.device, dtype=parameter.dtype)
        labels = labels.to(parameter.device)
        for timestep in solver.timesteps:
            predicted = self.predict_noise(sample, timestep, labels, guidance_scale)
            sample = solver.step(predicted, timestep, sample).prev_sample
        return ((sample.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


def save_glyph_diffusion(model: GlyphDiffusion, folder: Path, name: str = "glyph-ddpm",
                         dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    """Write `<name>.safetensors` (the UNet's tensors in `dtype`) and `<name>.json` (the config)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to(dtype).contiguous().cpu() for key, value in model.unet.state_dict().items()}
    weights, config = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_file(tensors, str(weights))
    config.write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    return weights, config


def read_glyph_diffusion(weights: Path, config: Path) -> GlyphDiffusion:
    """A GlyphDiffusion (float32) from the files `save_glyph_diffusion` wrote."""
    from safetensors.torch import load_file

    if not Path(weights).is_file() or not Path(config).is_file():
        raise DeltatuneError(f"diffusion model files {weights} / {config} are missing: expected both; reinstall "
                             "deltatune, or rebuild them with `python -m deltatune.data.pretrain_glyph_ddpm`")
    model = GlyphDiffusion(GlyphDiffusionConfig.from_dict(json.loads(Path(config).read_text())))
    tensors = {key: value.float() for key, value in load_file(str(weights)).items()}
    model.unet.load_state_dict(tensors)
    return model


@functools.lru_cache(maxsize=2)
def _shipped_tensors(files: Path) -> tuple[dict[str, Tensor], str]:
    from safetensors.torch import load_file

    weights, config = files / WEIGHTS_FILE, files / CONFIG_FILE
    if not weights.is_file():
        raise DeltatuneError(f"the pretrained glyph DDPM {weights} is missing; reinstall deltatune, or rebuild it "
                             "with `python -m deltatune.data.pretrain_glyph_ddpm`")
    return load_file(str(weights)), config.read_text()


def load_glyph_ddpm(files: Path | None = None) -> GlyphDiffusion:
    """A fresh copy of the pretrained glyph DDPM (float32), read from the package's files (offline; the file is
    read once per process and copied, so every call returns independent weights). Card: files/glyph-ddpm.md.
    `files`: another folder holding glyph-ddpm.safetensors and .json (a re-run of the pretraining script)."""
    tensors, config = _shipped_tensors(Path(files) if files is not None else FILES)
    model = GlyphDiffusion(GlyphDiffusionConfig.from_dict(json.loads(config)))
    model.unet.load_state_dict({key: value.float() for key, value in tensors.items()})
    return model

"""GlyphDiffusion: seeded sampling, LoRA on its UNet (merge exact, save -> load exact), the shipped weights'
denoising loss against their card, and `deltatune train --task diffusion-handwritten` end to end."""
from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.data.diffusion import FILES, WEIGHTS_FILE, GlyphDiffusion, GlyphDiffusionConfig
from deltatune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
SHIPPED = (FILES / WEIGHTS_FILE).is_file()
needs_weights = pytest.mark.skipif(not SHIPPED, reason="files/glyph-ddpm.safetensors not built yet "
                                   "(python -m deltatune.data.pretrain_glyph_ddpm)")
# A narrow copy of the architecture: the same block types (attention at 8x8 and 4x4), a quarter of the widths.
SMALL = GlyphDiffusionConfig(block_out_channels=(8, 16, 16), norm_num_groups=4, attention_head_dim=8)


def small_model(seed: int = 0) -> GlyphDiffusion:
    torch.manual_seed(seed)
    return GlyphDiffusion(SMALL)


def batch(count: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 16, 16, generator=generator), torch.randint(0, 62, (count,), generator=generator)


def test_sampling_is_deterministic_under_a_seeded_generator():
    model = small_model()
    labels = torch.tensor([0, 5, 61, 10])
    first = model.sample(labels, steps=4, generator=torch.Generator().manual_seed(3))
    again = model.sample(labels, steps=4, generator=torch.Generator().manual_seed(3))
    other = model.sample(labels, steps=4, generator=torch.Generator().manual_seed(4))
    assert first.shape == (4, 1, 16, 16) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    guided = model.sample(labels, steps=4, generator=torch.Generator().manual_seed(3), guidance_scale=2.0)
    assert not torch.equal(guided, first)


def test_given_starting_noise_is_the_noise_the_generator_would_draw_and_a_wrong_shape_is_refused():
    model = small_model()
    labels = torch.tensor([0, 5, 61])
    noise = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    drawn = model.sample(labels, steps=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.sample(labels, steps=3, noise=noise), drawn)
    with pytest.raises(ConfigError, match="one starting image per label"):
        model.sample(labels, steps=3, noise=noise[:2])


def test_forward_is_the_epsilon_mse_at_the_drawn_timesteps():
    model = small_model().eval()  # eval: no label dropout, so the draws are t then eps
    pixels, labels = batch()
    torch.manual_seed(5)
    out = model(pixels, labels)
    torch.manual_seed(5)
    timesteps = torch.randint(0, 1000, (len(pixels),))
    noise = torch.randn_like(pixels)
    assert torch.equal(out.timesteps, timesteps) and torch.equal(out.noise, noise)
    expected = model.denoising_loss(pixels, labels, timesteps, noise).loss
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert out.loss.dim() == 0 and out.loss.requires_grad


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ConfigError, match="class ids"):
        small_model().sample(torch.tensor([63]), steps=1)


def lora_unet(dtype: torch.dtype = torch.float64) -> GlyphDiffusion:
    model = small_model().to(dtype)
    config = dt.config_for("lora", rank=2, targets=r".*(to_q|to_v|conv1|conv2)", layer_types=("linear", "conv"))
    dt.adapt(model, config)
    with torch.no_grad():  # B starts at zero; make the delta visible
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def fixed_loss(model: GlyphDiffusion, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    pixels, labels = batch()
    generator = torch.Generator().manual_seed(1)
    timesteps = torch.randint(0, 1000, (len(pixels),), generator=generator)
    noise = torch.randn(pixels.shape, generator=generator)
    model.eval()
    with torch.no_grad():
        return model.denoising_loss(pixels.to(dtype), labels, timesteps, noise.to(dtype)).predicted_noise


def test_lora_on_the_unet_merges_exactly_and_reloads_exactly(tmp_path):
    model = lora_unet()
    adapted = {name for name, _ in model.named_parameters() if "lora_A" in name}
    assert any("attentions" in name for name in adapted) and any("resnets" in name for name in adapted)
    expected = fixed_loss(model)
    assert not torch.allclose(expected, fixed_loss(small_model().to(torch.float64)))
    dt.save_adapter(model, tmp_path / "adapter")
    loaded = dt.load_adapter(small_model().to(torch.float64), tmp_path / "adapter")
    # float64 round-off (~1e-15: conv kernels may sum in another order on a fresh model), not a lost delta
    torch.testing.assert_close(fixed_loss(loaded), expected, rtol=1e-12, atol=1e-12)
    dt.merge(model)
    torch.testing.assert_close(fixed_loss(model), expected, rtol=1e-10, atol=1e-10)


@needs_weights
def test_shipped_ddpm_denoising_loss_matches_its_card():
    from deltatune.data.diffusion import load_glyph_ddpm
    from deltatune.data.pretrain_glyph_ddpm import FIXED_BATCH, heldout_denoising_loss, source_splits

    card = json.loads((FILES / "glyph-ddpm-metrics.json").read_text())
    pixels, labels = source_splits()["test"]
    loss = heldout_denoising_loss(load_glyph_ddpm(), pixels[:FIXED_BATCH], labels[:FIXED_BATCH])
    assert loss == pytest.approx(card["fixed_batch_loss"], rel=1e-3)
    assert loss < 0.5  # far below the ~1.0 of an untrained model


@pytest.mark.slow  # ~80 s on the shared 2-core machine (model load, 3 LoRA steps, two evaluations)
@needs_weights
def test_train_smoke_on_diffusion_handwritten(tmp_path, capsys, monkeypatch):
    from deltatune.cli import main
    from deltatune.data import diffusion_eval, diffusion_tasks

    # the plumbing, not the metric: 16 samples in 2 steps instead of the scorer's 500 in 10
    monkeypatch.setattr(diffusion_tasks, "sample_like",
                        lambda model, labels: diffusion_eval.sample_like(model, labels, min_samples=16, steps=2))

    code = main(["train", "--task", "diffusion-handwritten", "--method", "lora", "--max-steps", "3",
                 "--batch-size", "8", "--out", str(tmp_path / "run")])
    assert code == 0
    assert "fd_cnn" in capsys.readouterr().out

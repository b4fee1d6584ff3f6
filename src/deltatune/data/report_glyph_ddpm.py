"""Measure the shipped glyph DDPM and write its model card (files/glyph-ddpm.md) and a sample grid.

    python -m deltatune.data.report_glyph_ddpm          # after pretrain_glyph_ddpm (reads glyph-ddpm-metrics.json)

Numbers: the pretraining metrics; base-domain sample quality (`glyph_degradation`: FD-CNN of one generated glyph
per test-font image vs the real test-font glyphs, and the GlyphCNN's accuracy on the generated glyphs), without
and with classifier-free guidance; the unadapted DDPM on the `diffusion-handwritten` test split (FD-CNN, digit
judge accuracy); seconds to sample 64 glyphs in 10 steps. Grid: benchmarks/results/glyph_ddpm_samples.png
(rows: classes 0-9, A-Z, a-z, 8 seeded samples each, 10 DPM-Solver++ steps).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deltatune.data.diffusion import FILES, GlyphDiffusion, load_glyph_ddpm
from deltatune.data.diffusion_eval import generation_report, glyph_degradation, load_digit_judge

GRID = Path("benchmarks/results/glyph_ddpm_samples.png")


def sample_grid(model: GlyphDiffusion, path: Path, per_class: int = 8) -> None:
    """A PNG of `per_class` samples of each of the 62 classes (columns of 31 classes, two halves side by side)."""
    import numpy as np
    from PIL import Image

    labels = torch.arange(model.config.num_classes).repeat_interleave(per_class)
    images = model.sample(labels, steps=10, generator=torch.Generator().manual_seed(0))[:, 0]
    tiles = images.view(model.config.num_classes, per_class, 16, 16)
    half = model.config.num_classes // 2
    rows = [torch.cat([torch.cat(list(tiles[c]), dim=1), torch.ones(16, 4), torch.cat(list(tiles[c + half]), dim=1)],
                      dim=1) for c in range(half)]
    array = (torch.cat(rows, dim=0).numpy() * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).resize((array.shape[1] * 3, array.shape[0] * 3), Image.NEAREST).save(path)


def measure(model: GlyphDiffusion) -> dict[str, object]:
    from deltatune.data.diffusion_tasks import load_diffusion_handwritten_task

    test = load_diffusion_handwritten_task().test
    started = time.perf_counter()
    model.sample(torch.arange(64) % 62, steps=10, generator=torch.Generator().manual_seed(0))
    sample_seconds = time.perf_counter() - started
    return {
        "sample_64_seconds": round(sample_seconds, 2),
        "glyphs": glyph_degradation(model),
        "glyphs_guidance_2": glyph_degradation(model, guidance_scale=2.0),
        "handwritten_base": generation_report(model, test.tensors["pixels"], test.labels, load_digit_judge()),
    }


def model_card(metrics: dict) -> str:
    """files/glyph-ddpm.md from the measured numbers."""
    quality = metrics["quality"]
    glyphs, guided, hand = quality["glyphs"], quality["glyphs_guidance_2"], quality["handwritten_base"]
    return f"""# glyph-ddpm: a class-conditional DDPM for 16x16 glyphs

- Architecture: diffusers `UNet2DModel` (sample 16, 1 channel, block_out_channels (32, 64, 64), 1 layer per
  block, attention at 8x8 and in the 4x4 middle, GroupNorm 8 groups, head dim 32), class embedding of 62
  glyph classes + 1 null class (classifier-free guidance); {metrics["parameters"]:,} parameters, shipped in
  bfloat16 (`glyph-ddpm.safetensors`, config `glyph-ddpm.json`). Loader: `deltatune.data.load_glyph_ddpm()`.
- Schedule: DDPM, 1,000 steps, cosine betas (`squaredcos_cap_v2`), epsilon prediction; sampling with
  DPM-Solver++ (2nd order multistep), 10 steps in every number below.
- Data: the 62 source classes ('0'-'9', 'A'-'Z', 'a'-'z') of the glyph arrays' training fonts, plain and
  jittered renderings ({metrics["train_images"]:,} images; fonts and licences: glyphs_manifest.json,
  FONTS_LICENSES.txt). Held out: the plain renderings of the test fonts ({metrics["test_images"]:,} images).
- Recipe: deltatune.train.Trainer, AdamW lr {metrics["lr"]}, batch {metrics["batch_size"]}, {metrics["steps"]}
  steps, 5% warm-up then cosine, clip 1.0, label dropout 0.1, seed {metrics["seed"]}, {metrics["threads"]}
  thread(s); EMA of the weights (decay 0.995) ships. {metrics["train_seconds"]:.0f} s of training on a shared
  2-core CPU.
- Held-out denoising loss (epsilon MSE, timesteps and noise from a fixed generator, shipped bf16 weights):
  test fonts {metrics["heldout_loss"]:.4f} (live weights, not EMA: {metrics["heldout_loss_live"]:.4f}),
  validation fonts {metrics["validation_loss"]:.4f}; the tests' fixed batch (first 256 test glyphs)
  {metrics["fixed_batch_loss"]:.5f}. Last training loss {metrics["last_train_loss"]}.
- Sample quality, one sample per test-font image (FD-CNN: Fréchet distance in the pretrained GlyphCNN's
  128-d features, FID-style, not Inception FID; accuracy: the GlyphCNN's on the samples):
  FD-CNN {glyphs["fd_cnn"]:.2f}, accuracy {glyphs["judge_accuracy"]:.3f}; with guidance 2:
  FD-CNN {guided["fd_cnn"]:.2f}, accuracy {guided["judge_accuracy"]:.3f}.
- Unadapted on `diffusion-handwritten` (test split, 500 samples): FD-CNN {hand["fd_cnn"]:.2f}, digit-judge
  accuracy {hand["judge_accuracy"]:.3f}.
- Speed: 64 samples in 10 steps took {quality["sample_64_seconds"]} s (1 thread, shared CPU).
- Samples: benchmarks/results/glyph_ddpm_samples.png.
- Command (under the shared lock, then the measurements and this card):

      python -m deltatune.data.pretrain_glyph_ddpm --out src/deltatune/data/files --steps 600 --threads 1
      python -m deltatune.data.report_glyph_ddpm
""" + (f"- Reproduced: {metrics['reproduced']}\n" if "reproduced" in metrics else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=Path, default=FILES,
                        help="the folder holding the DDPM to measure; its metrics and card are written there")
    parser.add_argument("--grid", type=Path, default=GRID)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_glyph_ddpm(args.files)
    metrics_path = args.files / "glyph-ddpm-metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["quality"] = measure(model)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    sample_grid(model, args.grid)
    (args.files / "glyph-ddpm.md").write_text(model_card(metrics))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the glyph UNet of the `unet` / `inputs` fixtures (tests/core/conftest.py) on its fixed batch."""
from __future__ import annotations

import torch


def run(model, inputs):
    sample, steps, labels = inputs
    with torch.no_grad():
        return model(sample, steps, class_labels=labels).sample

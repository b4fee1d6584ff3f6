"""Fixtures of tests/core: the shipped glyph DDPM's UNet in float64 and a fixed input batch (the real model the
file-format tests adapt; `core.glyph_unet.run` runs it)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def unet():
    from deltatune.data import load_glyph_ddpm

    return load_glyph_ddpm().unet.double().eval()


@pytest.fixture
def inputs(unet):
    torch.manual_seed(1)
    size = unet.config.sample_size
    return (torch.randn(2, unet.config.in_channels, size, size, dtype=torch.float64),
            torch.tensor([3, 400]), torch.tensor([1, 7]))

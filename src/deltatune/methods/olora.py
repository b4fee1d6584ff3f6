"""OLoRA: orthonormal low-rank adaptation (Büyükakyüz, 2024, arXiv:2406.01775).

    W0 = Q R (QR decomposition of the (out, in) matrix),   B = Q[:, :r],   A = R[:r],   W_res = W0 − s·B A

B starts orthonormal, A as the matching rows of R; the residual is the frozen base, kept exactly as PiSSA keeps it
(`methods.pissa`: ΔW = s·(B A − B0 A0) with (A0, B0) frozen buffers recomputed from W0, the base weights never
rewritten). As in peft's `olora_init`, the factors are not divided by the scale s, so the residual subtracts
s·Q_r R_r (the first r QR components exactly only when s = 1). peft folders with ``init_lora_weights="olora"``
load as peft loads them (the residual rebuilt from the base given); `pissa.to_plain_lora` converts an adapter
into a plain rank-2r LoRA against the original base. Precision and layers as PiSSA's (float32, or the weight's
dtype when wider; Linear, transformers Conv1D, convolutions by their matrix view).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from deltatune.core.registry import register_method
from deltatune.errors import config_check
from deltatune.methods.pissa import PiSSAConfig, PiSSADelta


@dataclass(frozen=True)
class OLoRAConfig(PiSSAConfig):
    """OLoRA: LoRA's rank, alpha, dropout, rslora (no randomized variant: `svd_iterations` must stay None)."""

    peft_init: ClassVar[str] = "olora"

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.svd_iterations is None, "svd_iterations", self.svd_iterations, "None (OLoRA uses a QR)")


@register_method("olora", OLoRAConfig, "OLoRA: LoRA started from W0's QR factors, the residual as the frozen base")
class OLoRADelta(PiSSADelta):
    """OLoRA: LoRA started from W0's QR factors, the residual as the frozen base."""

    def factorize(self, matrix: Tensor) -> tuple[Tensor, Tensor]:
        q, r = torch.linalg.qr(matrix)
        return r[: self.config.rank], q[:, : self.config.rank]

"""Transformed LoRA via tensor decomposition, "TLoRA" (Tao, Takida, Murata, Zhao, Mitsufuji, ICCV 2025,
arXiv:2501.08727; official code: marcocst/PEFTDiff).

    W' = W0 · T + s · Δ        T ∈ R^{in × in} a dense, full-rank transform on the input side, Δ a compact residual

T is a tensor-ring matrix (TRM, `functional.tensor_ring`): in = Π_d I_d, cores A^d of shape (I_d, I_d, R, R)
(R = ``transform_rank``), ``T[ī, j̄] = tr(A¹[i₁, j₁] ⋯ A^D[i_D, j_D])`` (row-major mode order, as the official
code's reshape). Every slice ``A^d[:, :, r, r'] = I / R``, so T = I exactly (the paper's Prop. 1); with R = 1 T is
the Kronecker product of D identity-initialized I_d × I_d matrices (the official default).

The residual Δ (out × in), zero at init so the adapted model equals the base model at step 0 (``residual``):

- ``"tensor_ring"`` (the paper's form, the official ``ttv``): Δ viewed as the 2D-way tensor (O_1..O_D, I_1..I_D),
  a tensor ring of 2D three-way cores (n, r, r), output modes first. The first output core starts at 0, the
  other output cores N(0, (√O_k / r²)²), the input cores N(0, 1/I_k), the official code's σ's.
- ``"tensor_ring_matrix"`` (the official ``ttm``): Δ a TRM matrix of D four-way cores (O_d, I_d, r, r); the
  first starts at 0, the others Kaiming-normal with a = √5 (std 1/√(3 · I_d r²)), as the official code.
- ``"lora"`` (the official script's choice): Δ = B A, B = 0, A Kaiming-normal with a = √5.
- ``"none"``: T alone (the paper's "transform only" ablation). ``transform_rank=0`` gives Δ alone.

s = alpha / √rank (rsLoRA, the official default) or alpha / rank with ``rslora=False``.

The identity regularizer (paper): ``Σ_d Σ_{r,r'} ‖A^d[:, :, r, r'] − I/R‖_F`` (norms, not squared), returned by
`regularization()` times ``identity_weight`` (the trainer adds it, as AdaLoRA's orthogonality term); 0 = off.

Modes: a size found in the official table (320 → 4·8·10, 640 → 8·8·10, 768 → 8·8·12, 1280 → 8·10·16,
2048 → 8·16·16) uses it when ``num_modes`` is 3; others the ascending ``num_modes`` factors >= 2 with the
smallest Σ I_d² (384 → 6·8·8, 1536 → 8·12·16); ``modes={"384": [4, 96]}`` overrides per size. A size that
cannot be split into ``num_modes`` factors >= 2 (a prime, say) is refused by name (the fix: ``modes`` for that
size, e.g. ``{"7": [7]}``, a dense T, or excluding the layer). ``tensor_ring_matrix`` needs the same number of
modes for in and out (true unless ``modes`` says otherwise).

A weight-space delta: the layer runs with W' on the weight path, W0 · T contracted mode by mode
(O(out · in · Σ I_d · R³), never the dense in × in T). Merge writes W'; W0 · T is not a difference that can
be subtracted, and T may not stay invertible, so merge keeps W0 (one weight-sized copy per merged layer, not
saved) and unmerge restores it bit for bit. Several TLoRA adapters on one layer chain (each transforms the
weight the previous one produced), in forward and merge alike.

Saved tensors per adapted module: ``tlora_transform_{d}`` (I_d, I_d, R, R) for d = 0..D−1 (none with
transform_rank 0); ``tlora_residual_{k}``: (n_k, r, r) for k over the output modes then the input modes
(tensor_ring) or (O_d, I_d, r, r) (tensor_ring_matrix); ``lora_A`` (r, in) and ``lora_B`` (out, r) (lora).

Defaults and deviations:
- rank 1, transform_rank 1, alpha 1, rsLoRA: the official script's settings (the paper body's TR ranks were not
  readable to us); residual "tensor_ring", the paper's form (the script runs "lora").
- Linear and transformers Conv1D only (the paper and code adapt attention projections); convolutions and
  embeddings are refused.
- identity_weight 0: the released code has no regularizer and its weight in the paper was not found.
- The paper's orthogonal regularizer (via the TRM product rule) is not implemented.
- The official code casts the adapted weight to the input dtype; here W' is in the base weight's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import CONV1D_HF, LINEAR, LayerInfo
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, NotMergeableError, config_check
from deltatune.functional.tensor_ring import (
    balanced_modes,
    identity_ring_cores,
    ring_matrix,
    ring_tensor,
    times_ring_matrix,
)

RESIDUALS = ("tensor_ring", "tensor_ring_matrix", "lora", "none")
OFFICIAL_MODES = {320: (4, 8, 10), 640: (8, 8, 10), 768: (8, 8, 12), 1280: (8, 10, 16), 2048: (8, 16, 16)}


@dataclass(frozen=True)
class TLoRAConfig(DeltaConfig):
    """TLoRA hyper-parameters.

    Args:
        rank: r, the residual's tensor-ring rank (or LoRA rank with residual="lora").
        transform_rank: R, the TRM rank of T (1 = Kronecker factors); 0 = no transform (Δ alone).
        residual: "tensor_ring" (paper), "tensor_ring_matrix", "lora" or "none" (T alone).
        alpha: the residual's scale numerator; s = alpha / √rank (rslora) or alpha / rank.
        rslora: s = alpha / √rank (the official default) instead of alpha / rank.
        num_modes: D, how many modes each dimension is split into.
        modes: explicit factorizations by size, {"384": [6, 8, 8]}; they win over the table and the search.
        identity_weight: λ of the identity regularizer Σ ‖A^d[:, :, r, r'] − I/R‖_F (0 = off).
    """

    budget_field: ClassVar[str | None] = "rank"

    rank: int = 1
    transform_rank: int = 1
    residual: str = "tensor_ring"
    alpha: float = 1.0
    rslora: bool = True
    num_modes: int = 3
    modes: dict[str, tuple[int, ...]] | None = None
    identity_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(self.rank > 0, "rank", self.rank, "an integer > 0")
        config_check(self.transform_rank >= 0, "transform_rank", self.transform_rank, "an integer >= 0 (0 = no T)")
        config_check(self.residual in RESIDUALS, "residual", self.residual, f"one of {RESIDUALS}")
        config_check(self.transform_rank > 0 or self.residual != "none", "residual", self.residual,
                     "a residual when transform_rank=0 (with neither, nothing trains)",
                     "set transform_rank >= 1 or a residual")
        config_check(self.alpha > 0, "alpha", self.alpha, "a number > 0")
        config_check(self.num_modes >= 1, "num_modes", self.num_modes, "an integer >= 1")
        config_check(self.identity_weight >= 0, "identity_weight", self.identity_weight, "a number >= 0")
        for size, factors in (self.modes or {}).items():
            valid = size.isdigit() and len(factors) > 0 and all(f >= 1 for f in factors)
            config_check(valid and math.prod(factors) == int(size), "modes", dict(self.modes or {}),
                         "a mapping from a size to positive factors whose product is that size, {\"384\": [6, 8, 8]}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def modes_for(self, size: int, where: str) -> tuple[int, ...]:
        """The mode sizes of a dimension (see the module docstring), or a ConfigError naming it."""
        chosen = (self.modes or {}).get(str(size))
        if chosen is not None:
            return tuple(chosen)
        if self.num_modes == 3 and size in OFFICIAL_MODES:
            return OFFICIAL_MODES[size]
        found = balanced_modes(size, self.num_modes)
        if found is None:
            raise ConfigError(
                f"tlora on {where}: size {size} cannot be split into num_modes={self.num_modes} factors >= 2; "
                f"give its factors with modes={{\"{size}\": [...]}} (e.g. [{size}] for a dense transform), lower "
                "num_modes, or exclude the layer"
            )
        return found


@register_method("tlora", TLoRAConfig, "TLoRA: W0·T + s·Δ, T a tensor-ring-matrix transform (identity at init), "
                 "Δ a tensor-ring residual")
class TLoRADelta(Delta):
    """TLoRA: W0·T + s·Δ, T a tensor-ring-matrix transform (identity at init), Δ a tensor-ring residual."""

    kind = DeltaKind.WEIGHT
    layer_kinds = frozenset({LINEAR, CONV1D_HF})

    def __init__(self, config: TLoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        where = module_name or layer.type_name
        self.transform_count = 0
        if config.transform_rank > 0:
            in_modes = config.modes_for(layer.in_features, where)
            for d, core in enumerate(identity_ring_cores(in_modes, config.transform_rank)):
                self.register_parameter(f"tlora_transform_{d}", nn.Parameter(core))
            self.transform_count = len(in_modes)
        self.residual_count = 0
        if config.residual in ("tensor_ring", "tensor_ring_matrix"):
            self._ring_residual(config, layer, where)
        elif config.residual == "lora":
            self.lora_A = nn.Parameter(torch.empty(config.rank, layer.in_features))
            self.lora_B = nn.Parameter(torch.zeros(layer.out_features, config.rank))
            nn.init.kaiming_normal_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("scale", torch.tensor(config.scale, dtype=torch.float64), persistent=False)
        self.register_buffer("merged_base", None, persistent=False)  # W0 at merge time, for an exact unmerge

    def _ring_residual(self, config: TLoRAConfig, layer: LayerInfo, where: str) -> None:
        out_modes = config.modes_for(layer.out_features, where)
        in_modes = config.modes_for(layer.in_features, where)
        r = config.rank
        if config.residual == "tensor_ring":
            shapes = [(n, r, r) for n in (*out_modes, *in_modes)]
            stds = [0.0] + [math.sqrt(n) / r**2 for n in out_modes[1:]] + [1 / math.sqrt(n) for n in in_modes]
        else:
            if len(out_modes) != len(in_modes):
                raise ConfigError(
                    f"tlora on {where}: residual='tensor_ring_matrix' needs as many output as input modes, got "
                    f"{out_modes} and {in_modes}; give matching factorizations with modes=, or use residual="
                    "'tensor_ring'"
                )
            shapes = [(o, i, r, r) for o, i in zip(out_modes, in_modes)]
            stds = [0.0] + [1 / math.sqrt(3 * i * r * r) for i in in_modes[1:]]  # Kaiming-normal, a = √5
        for k, (shape, std) in enumerate(zip(shapes, stds)):
            core = torch.zeros(shape) if std == 0 else torch.randn(shape) * std
            self.register_parameter(f"tlora_residual_{k}", nn.Parameter(core))
        self.residual_count = len(shapes)

    # --- the pieces ---------------------------------------------------------------------------------------
    def transform_cores(self) -> list[Tensor]:
        return [getattr(self, f"tlora_transform_{d}") for d in range(self.transform_count)]

    def residual_cores(self) -> list[Tensor]:
        return [getattr(self, f"tlora_residual_{k}") for k in range(self.residual_count)]

    def transform(self) -> Tensor | None:
        """The dense T (in × in), or None without a transform (for inspection; forward never forms it)."""
        return ring_matrix(self.transform_cores()) if self.transform_count else None

    def residual(self) -> Tensor | None:
        """Δ as an (out, in) matrix, unscaled; None with residual="none"."""
        form = self.config.residual
        if form == "tensor_ring":
            return ring_tensor(self.residual_cores()).reshape(self.layer.out_features, self.layer.in_features)
        if form == "tensor_ring_matrix":
            return ring_matrix(self.residual_cores())
        if form == "lora":
            return self.lora_B @ self.lora_A
        return None

    def identity_penalty(self) -> Tensor:
        """Σ_d Σ_{r,r'} ‖A^d[:, :, r, r'] − I/R‖_F, 0 at init (unweighted)."""
        total = self.scale.new_zeros(()).to(self._dtype())
        for core in self.transform_cores():
            target = torch.eye(core.shape[0], dtype=core.dtype, device=core.device) / core.shape[-1]
            total = total + torch.linalg.vector_norm(core - target[:, :, None, None], dim=(0, 1)).sum()
        return total

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # --- the math -----------------------------------------------------------------------------------------
    def adapted_weight(self, base_weight: Tensor) -> Tensor:
        matrix = self.layer.to_matrix(base_weight).to(self._dtype())
        if self.transform_count:
            matrix = times_ring_matrix(matrix, self.transform_cores())
        residual = self.residual()
        if residual is not None:
            matrix = matrix + self.scale.to(residual.dtype) * residual
        return self.layer.from_matrix(matrix).to(base_weight.dtype)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self.adapted_weight(base_weight) - base_weight

    def regularization(self) -> Tensor | None:
        if self.config.identity_weight == 0 or not self.transform_count:
            return None
        return self.config.identity_weight * self.identity_penalty()

    # --- merging: keep W0, since W0·T cannot be subtracted ----------------------------------------------
    def merge_into(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        self.merged_base = weight.detach().clone()
        return self.adapted_weight(weight).detach(), bias

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.merged_base is None:
            raise NotMergeableError(f"tlora on {self.module_name or 'this layer'} was not merged; nothing to unmerge")
        base, self.merged_base = self.merged_base, None
        return base.to(dtype=weight.dtype, device=weight.device), bias

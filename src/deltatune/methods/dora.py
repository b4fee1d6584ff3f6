"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_c                          (paper Eq. 5)

with s = alpha / r (alpha / sqrt(r) with rsLoRA), the norm taken per output unit over the fan-in (each row of the
(out, fan_in) matrix view: over the input dimension of a Linear, over every dimension but the output channel of a
convolution, over the vocabulary for an embedding, as peft computes it), m ∈ R^out trainable and initialized to
‖W0‖_c, A and B initialized as LoRA's (B = 0), so the adapted model equals the base model at step 0. The norm is
**detached** (paper §4.3, as peft does): it follows A and B in value but gets no gradient.

A weight-space delta. It runs on the activation path (`forward_with_base`), never forming W':

    y = g ⊙ (x W0ᵀ + s · (x Aᵀ) Bᵀ) + b,    g = m / ‖W0 + s·BA‖_c (detached)

fused into one autograd node for a plain Linear / transformers Conv1D (`functional.magnitude`); otherwise peft's
formula `base(x) + (g − 1) ⊙ (base(x) − b) + g ⊙ s · B A x` (convolutions: g on the channel dimension;
embeddings: `g ⊙ (E[x] + s · A[x] B)`). With dropout p > 0 in training, peft's special form is followed exactly:
`base(x) + (g − 1) ⊙ op(drop(x), W0) + g ⊙ s · B A drop(x)` (x itself, not drop(x), feeds the base term).

Merge writes W' exactly; unmerge inverts it with the norm kept from the merge (W0 = W'/g − s·BA; the norm
cannot be recovered from W' alone). Several DoRA adapters active on one layer chain in the active order (each
normalizes the weight the previous one produced, which is also how they merge); peft instead adds each one's
term computed from W0.

Saved tensors: LoRA's (``lora_A``, ``lora_B``, peft's shapes) and ``lora_magnitude`` — (out,) for dense layers and
embeddings, (1, out, 1, ...) for convolutions, broadcast against the layer output, which are peft's shapes of
``lora_magnitude_vector``.

Defaults as our LoRA (rank 8, alpha 8, dropout 0); the paper's recipes tune rank/alpha per task.
Deviations and limits: no ``lora_bias`` (refused); grouped convolutions refused (as LoRA). ΔW = W' − W0 is not
low-rank (the magnitude rescales W0's rows), so DoRA does not declare `HasRank`: combining it into a LoRA
(`combine_adapters`) needs an explicit rank and approximates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import ALL_KINDS, CONV, EMBEDDING, LINEAR, LayerInfo, base_bias
from deltatune.core.registry import register_method
from deltatune.errors import NotMergeableError, config_check
from deltatune.functional.lowrank import lowrank_delta_weight
from deltatune.functional.magnitude import lowrank_row_norms, magnitude_lowrank_linear
from deltatune.methods.lora import _LOWRANK_PATH, LoRAConfig, LoRADelta, _check_layer, _fusable, lowrank_factors


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA hyper-parameters: LoRA's (rank, alpha, dropout, rslora, init), without ``bias``.

    A peft folder with ``use_dora=True`` loads as this config; `save_adapter(format="peft")` writes one.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(not self.bias, "bias", self.bias, "False (DoRA with a lora_bias is not supported)")

    def to_peft_config(self, target_paths: list[str], extra_paths: list[str]) -> dict[str, Any]:
        return super().to_peft_config(target_paths, extra_paths) | {"use_dora": True}


@register_method("dora", DoRAConfig, "DoRA: magnitude m ⊙ direction (W0 + sBA)/‖W0 + sBA‖, norm detached")
class DoRADelta(Delta):
    """DoRA: magnitude m ⊙ direction (W0 + sBA)/‖W0 + sBA‖, norm detached."""

    kind = DeltaKind.WEIGHT
    layer_kinds = ALL_KINDS

    def __init__(self, config: DoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        config = config.at_module(module_name)  # this module's rank and alpha (LoRA's rank_pattern / alpha_pattern)
        super().__init__(config, layer, module_name)
        _check_layer(config, layer, module_name)
        self.lora_A, self.lora_B = lowrank_factors(layer, config.rank)
        # peft's magnitude layout: (1, out, 1, ...) for a convolution, (out,) otherwise
        conv = layer.kind == CONV
        shape = (1, layer.out_features, *([1] * layer.conv_dims)) if conv else (layer.out_features,)
        self.lora_magnitude = nn.Parameter(torch.ones(shape))
        self.register_buffer("scale", torch.tensor(config.scale, dtype=torch.float64), persistent=False)
        self.register_buffer("merged_norm", None, persistent=False)  # ‖W0 + sBA‖_c at merge time, for unmerge
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        LoRADelta.reset_parameters(self)  # type: ignore[arg-type]  # LoRA's init of A and B, same tensor names

    def lowrank_pair(self) -> tuple[nn.Parameter, nn.Parameter, float]:
        """`HasLowRankPair`: A and B reach the layer through the direction W0 + s·B·A (the norm is detached, so
        G is the gradient with respect to that direction)."""
        return self.lora_A, self.lora_B, float(self.scale)

    @torch.no_grad()
    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        """m = ‖W0 + s·BA‖_c (= ‖W0‖_c with B = 0; peft computes it with the initial A, B the same way)."""
        self.lora_magnitude.copy_(self._norm(base_weight).view(self.lora_magnitude.shape))

    # --- the math -----------------------------------------------------------------------------------------
    def _norm(self, base_weight: Tensor) -> Tensor:
        """‖W + s·BA‖_c, (out,), detached."""
        matrix = self.layer.to_matrix(base_weight.detach())
        return lowrank_row_norms(matrix, self.lora_A.detach().to(matrix.dtype), self.lora_B.detach().to(matrix.dtype),
                                 self.scale)

    def _gain(self, norm: Tensor) -> Tensor:
        """g = m / n as (out,)."""
        return self.lora_magnitude.reshape(-1) / norm

    def _directed(self, base_weight: Tensor, gain: Tensor) -> Tensor:
        """g ⊙ (W + s·BA) in the native shape."""
        matrix = self.layer.to_matrix(base_weight) + self.layer.to_matrix(
            lowrank_delta_weight(self.layer, self.lora_A, self.lora_B, self.scale).to(base_weight.dtype))
        return self.layer.from_matrix(gain.to(base_weight.dtype)[:, None] * matrix)

    def adapted_weight(self, base_weight: Tensor) -> Tensor:
        return self._directed(base_weight, self._gain(self._norm(base_weight)))

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self.adapted_weight(base_weight) - base_weight

    def merge_into(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        norm = self._norm(weight)
        self.merged_norm = norm
        return self._directed(weight, self._gain(norm)).detach(), bias

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """W0 = W'/g − s·BA with the norm kept at merge time."""
        if self.merged_norm is None:
            raise NotMergeableError(f"dora on {self.module_name or 'this layer'} was not merged; nothing to unmerge")
        gain = self._gain(self.merged_norm).detach().to(weight.dtype)
        if not gain.all():
            raise NotMergeableError(f"dora on {self.module_name or 'this layer'} has a magnitude of exactly 0, so its "
                                    "merge cannot be undone; unload the adapter with merge=True instead")
        change = lowrank_delta_weight(self.layer, self.lora_A, self.lora_B, self.scale).detach().to(weight.dtype)
        base = self.layer.to_matrix(weight) / gain[:, None] - self.layer.to_matrix(change)
        self.merged_norm = None
        return self.layer.from_matrix(base), bias

    # --- the activation path ------------------------------------------------------------------------------
    def forward_with_base(self, x: Tensor, base_layer: nn.Module) -> Tensor | None:
        """What the layer computes with this delta (see the module docstring), on the activation path."""
        norm = self._norm(base_layer.weight)
        dropping = self.training and self.config.dropout > 0
        if not dropping and _fusable(self, x, base_layer):  # type: ignore[arg-type]
            weight = base_layer.weight if self.layer.kind == LINEAR else base_layer.weight.t()
            return magnitude_lowrank_linear(x, weight, base_layer.bias, self.lora_A, self.lora_B, self.config.scale,
                                            self.lora_magnitude, norm)
        return self._peft_form(x, base_layer, self._gain(norm), dropping)

    def _peft_form(self, x: Tensor, base_layer: nn.Module, gain: Tensor, dropping: bool) -> Tensor:
        result = base_layer(x)
        channel = gain.view(-1, *([1] * self.layer.conv_dims)) if self.layer.kind == CONV else gain
        if self.layer.kind == EMBEDDING:
            branch = _LOWRANK_PATH[EMBEDDING](self, x) * self.scale
            return (channel * (result + branch.to(result.dtype))).to(result.dtype)
        x_in = self.dropout(x.to(self.lora_A.dtype)) if dropping else x.to(self.lora_A.dtype)
        branch = _LOWRANK_PATH[self.layer.kind](self, x_in) * self.scale
        if dropping:
            direction = self.layer.op(x_in.to(result.dtype), base_layer.weight, None)
        else:
            bias = base_bias(base_layer)
            direction = result if bias is None else result - self._per_channel(bias)
        return (result + (channel - 1) * direction + channel * branch).to(result.dtype)

    def _per_channel(self, vector: Tensor) -> Tensor:
        return vector.view(-1, *([1] * self.layer.conv_dims)) if self.layer.kind == CONV else vector

    def peft_tensor_names(self) -> dict[str, str]:
        names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"} if self.layer.kind == EMBEDDING else {
            "lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
        return names | {"lora_magnitude": "lora_magnitude_vector"}

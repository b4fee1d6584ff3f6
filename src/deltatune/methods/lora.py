"""LoRA: low-rank adaptation (Hu et al., 2021, arXiv:2106.09685).

    h = W0 x + (alpha / r) · B A x                                    (paper Eq. 3, §4.1)

A ∈ R^{r×in} starts random (Kaiming-uniform, as peft and the official loralib do), B ∈ R^{out×r} starts at
zero, so the adapted model equals the base model at step 0. rsLoRA (Kalajdzievski, 2023) scales by
alpha / sqrt(r) instead. The forward pass runs on the activation path, `B(A(dropout(x)))`, and never forms ΔW.

Saved tensors (per adapted module): ``lora_A`` (r, in) — (r, in, *kernel) for convolutions — and ``lora_B``
(out, r) — (out, r, 1, ...) for convolutions. For an embedding, ``lora_A`` is (r, num_embeddings) and
``lora_B`` (dim, r), initialized A = 0, B ~ N(0, 1), as peft does. These are peft's shapes, so peft folders
convert by renaming keys only. With ``bias=True`` also ``lora_bias`` (out,): Δb = scale · lora_bias, the bias term
peft calls ``lora_B.bias`` with ``lora_bias=True`` (`combine_adapters` uses it to carry BitFit-like bias deltas;
peft has none for embeddings, so such an adapter saves in deltatune format only).

Defaults follow peft (rank 8, alpha 8, dropout 0); the paper tunes alpha once and fixes it.
Per-layer rank and alpha: `rank_pattern` / `alpha_pattern` (peft's fields of those names, with peft's matching
rule, `pattern_value`) override `rank` / `alpha` for the modules they match; each delta is built from
`LoRAConfig.at_module(path)`, the config with that module's rank and alpha. They are saved in both formats and
read from peft folders (what `deltatune extract-lora --layout pattern` writes).
Deviation: grouped convolutions are not supported (clear error).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import ALL_KINDS, CONV, CONV1D_HF, EMBEDDING, LINEAR, LayerInfo, is_hf_conv1d
from deltatune.core.registry import register_method
from deltatune.errors import ConfigError, HotSwapError, UnsupportedLayerError, config_check
from deltatune.functional.lowrank import lowrank_delta_weight, lowrank_linear
from deltatune.methods.lora_peft import check_pattern, check_peft_lora_config, pattern_value, peft_variant_method

INITS = ("kaiming", "gaussian", "random")


@dataclass(frozen=True)
class LoRAConfig(DeltaConfig):
    """LoRA hyper-parameters.

    Args:
        rank: r, the rank of the update (0 < r < min(in, out)).
        alpha: the scale numerator: ΔW = (alpha / r) B A (or alpha / sqrt(r) with rslora).
        dropout: dropout on the LoRA branch's input, in [0, 1).
        rslora: use the rank-stabilized scale alpha / sqrt(r).
        init: "kaiming" (A Kaiming-uniform, B = 0; the paper/peft default), "gaussian" (A ~ N(0, 1/r), B = 0),
            or "random" (B random too: output changes at step 0; for tests and experiments).
        bias: also learn a bias on the update's output (``lora_bias``, starts at 0; peft's ``lora_bias``).
        rank_pattern: module pattern -> rank, overriding `rank` where it matches (peft's ``rank_pattern``): a key
            matches a module whose dotted path it matches as a whole dotted suffix, read as a regular expression
            (``"q_proj"``, ``"layers.0.mlp.up_proj"``, ``"layers\\.[0-3]\\..*_proj"``); the first matching key wins
            (`pattern_value`), in sorted key order: the order of every adapter_config.json, which peft writes
            with sorted keys (peft's in-memory model uses the order given, so overlapping keys given unsorted
            can change ranks across a peft save; keep keys that match one module to one key, or sort them).
        alpha_pattern: module pattern -> alpha, overriding `alpha` the same way (peft's ``alpha_pattern``).
    """
    budget_field: ClassVar[str | None] = "rank"

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    bias: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        config_check(isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "an integer > 0")
        config_check(self.alpha > 0, "alpha", self.alpha, "a number > 0")
        config_check(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")
        config_check(self.init in INITS, "init", self.init, f"one of {INITS}")
        config_check(isinstance(self.bias, bool), "bias", self.bias, "True or False")
        check_pattern(self.rank_pattern, "rank_pattern", "ranks", lambda rank: isinstance(rank, int) and rank > 0)
        check_pattern(self.alpha_pattern, "alpha_pattern", "alphas", lambda alpha: alpha > 0)
        # Own copies in sorted key order: peft's first match depends on the order, and every adapter_config.json
        # (peft's and ours) is written with sorted keys, so sorting here makes an adapter match the same before
        # and after a save (and as peft matches any folder it loads).
        object.__setattr__(self, "rank_pattern", dict(sorted(self.rank_pattern.items())))
        object.__setattr__(self, "alpha_pattern", dict(sorted(self.alpha_pattern.items())))

    @property
    def scale(self) -> float:
        """alpha / r (or / √r): the scale of a module without a pattern; `at_module(path).scale` is one module's."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def at_module(self, module_name: str) -> LoRAConfig:
        """The config of the delta on module `module_name`: its rank and alpha from the patterns (peft's rule,
        `pattern_value`), and no patterns. Without patterns, this config itself."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        return dataclasses.replace(self, rank=pattern_value(self.rank_pattern, module_name, self.rank),
                                   alpha=pattern_value(self.alpha_pattern, module_name, self.alpha),
                                   rank_pattern={}, alpha_pattern={})

    # --- peft interop (used by core.peft_format) ------------------------------------------------------------
    def to_peft_config(self, target_paths: list[str], extra_paths: list[str]) -> dict[str, Any]:
        return {
            "peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "use_rslora": self.rslora, "target_modules": sorted(target_paths),
            "modules_to_save": sorted(extra_paths) or None, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_dora": False, "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": None, "layers_pattern": None, "task_type": None, "inference_mode": True,
            "base_model_name_or_path": None, "revision": None, "lora_bias": self.bias, "exclude_modules": None,
        }

    @classmethod
    def from_peft_config(cls, peft: dict[str, Any], tensor_keys: Iterable[str]) -> LoRAConfig:
        """The LoRAConfig of a peft LoRA folder: `peft` is its adapter_config.json, `tensor_keys` its tensors'
        keys without peft's ``base_model.model.`` prefix. Every peft field is honoured or refused by name
        (`methods.lora_peft`); the adapted modules are the ones the file holds LoRA tensors for."""
        check_peft_lora_config(peft)
        from deltatune.core.registry import method_entry  # the variant's class registers after this one

        variant = method_entry(peft_variant_method(peft)).config_cls
        keys = list(tensor_keys)
        targets = sorted({key[: -len(suffix)] for key in keys for suffix in PEFT_SUFFIXES if key.endswith(suffix)})
        if not targets:
            raise ConfigError("this peft LoRA folder holds no LoRA tensors (lora_A / lora_B); it adapts nothing")
        others = [key for key in keys if not key.endswith(PEFT_SUFFIXES)]
        saved = [name for name in _as_list(peft.get("modules_to_save")) if any(f".{name}." in f".{k}" for k in others)]
        return variant(
            rank=peft.get("r", 8), alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
            rslora=peft.get("use_rslora", False), bias=peft.get("lora_bias") or False, targets=tuple(targets),
            extra_trainable=tuple(saved), rank_pattern=peft.get("rank_pattern") or {},
            alpha_pattern=peft.get("alpha_pattern") or {},
        )


# peft's key suffixes of a LoRA layer's tensors (linear and convolution; embedding)
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


@register_method("lora", LoRAConfig, "LoRA: low-rank update (alpha/r)·BA added on the activation path")
class LoRADelta(Delta):
    """LoRA: low-rank update (alpha/r)·BA added on the activation path."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = ALL_KINDS
    # `SwapsRank`: the fields another adapter may differ in when it is hot-swapped in
    hot_swappable_fields: ClassVar[tuple[str, ...]] = ("rank", "alpha", "rslora")
    swap_capacity: int | None = None  # the max rank once prepared for hot-swapping

    def __init__(self, config: LoRAConfig, layer: LayerInfo, module_name: str = "") -> None:
        patterned = bool(config.rank_pattern or config.alpha_pattern)
        config = config.at_module(module_name)  # this module's rank and alpha (rank_pattern / alpha_pattern)
        super().__init__(config, layer, module_name)
        # hot-swapping pads every layer to one rank under one adapter-wide config, which per-layer alphas break
        self.patterned = patterned
        _check_layer(config, layer, module_name)
        self.lora_A, self.lora_B = lowrank_factors(layer, config.rank)
        # float64 so that float64 models keep the exact scale; `adapt` casts it with the other tensors
        self.register_buffer("scale", torch.tensor(config.scale, dtype=torch.float64), persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.bias:
            self.lora_bias = nn.Parameter(torch.zeros(layer.out_features))
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """`HasRank`: a LoRA's rank is fixed by its config."""
        return self.config.rank

    def lowrank_pair(self) -> tuple[nn.Parameter, nn.Parameter, float]:
        """`HasLowRankPair`: ΔW = s·B·A (for an embedding, the transposed table: Eᵀ + s·B·A)."""
        return self.lora_A, self.lora_B, float(self.scale)

    def reset_parameters(self) -> None:
        init = self.config.init
        if self.layer.kind == EMBEDDING:  # peft: the lookup side starts at zero, the projection random
            nn.init.zeros_(self.lora_A) if init != "random" else nn.init.normal_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.config.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        x_in = x if self.layer.kind == EMBEDDING else self.dropout(x.to(self.lora_A.dtype))
        out = _LOWRANK_PATH[self.layer.kind](self, x_in) * self.scale
        return self._with_bias(out).to(x.dtype if x.is_floating_point() else self.lora_A.dtype)

    def _with_bias(self, out: Tensor) -> Tensor:
        """out + Δb, broadcast over the batch (and the spatial dimensions of a convolution)."""
        if not self.config.bias:
            return out
        change = self.scale * self.lora_bias
        return out + (change.view(-1, *([1] * self.layer.conv_dims)) if self.layer.kind == CONV else change)

    def forward_with_base(self, x: Tensor, base_layer: nn.Module) -> Tensor | None:
        """base_layer(x) + forward(x) in one fused autograd node (`functional.lowrank.lowrank_linear`), or None
        when this call cannot be fused (the host then runs the two separately): only for a plain nn.Linear or
        transformers Conv1D without hooks, one dtype throughout, outside autocast, and no active dropout on the
        branch. Not once prepared for hot-swapping: the fused node takes the scale as a number, which a compiled
        graph would bake in, while a swap changes the `scale` tensor."""
        if self.swap_capacity is not None:
            return None
        if self.training and self.config.dropout > 0 or not _fusable(self, x, base_layer):
            return None
        weight = base_layer.weight if self.layer.kind == LINEAR else base_layer.weight.t()
        return self._with_bias(lowrank_linear(x, weight, base_layer.bias, self.lora_A, self.lora_B, self.config.scale))

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return lowrank_delta_weight(self.layer, self.lora_A, self.lora_B, self.scale).to(base_weight.dtype)

    def delta_bias(self, base_bias: Tensor | None) -> Tensor | None:
        return self.scale * self.lora_bias if self.config.bias else None

    @torch.no_grad()
    def assign_delta_weight(self, delta_weight: Tensor) -> None:
        """Set A and B so that ΔW is the best rank-r approximation of `delta_weight` (native shape).

        Eckart–Young: with the SVD of the (out, fan_in) matrix view of ΔW / scale, B = U_r √S_r and
        A = √S_r V_rᵀ (the square root splits the singular values evenly between the factors). Exact when
        `delta_weight` has rank ≤ r. Used to combine adapters into a new LoRA (`deltatune.merging.adapters`).
        """
        matrix = self.layer.to_matrix(delta_weight).double() / float(self.scale)
        left, values, right = torch.linalg.svd(matrix, full_matrices=False)
        root = values[: self.config.rank].sqrt()
        up, down = left[:, : self.config.rank] * root, root[:, None] * right[: self.config.rank]
        self.lora_B.copy_(up.reshape(self.lora_B.shape))
        self.lora_A.copy_(down.reshape(self.lora_A.shape))

    @torch.no_grad()
    def assign_delta_bias(self, delta_bias: Tensor) -> None:
        """Set lora_bias so that Δb equals `delta_bias` (out,); needs a config with bias=True."""
        if not self.config.bias:
            raise ConfigError(f"the LoRA on {self.module_name or 'this layer'} has no bias term; adapt with "
                              "LoRAConfig(bias=True) to assign one")
        self.lora_bias.copy_(delta_bias.reshape(-1).double() / float(self.scale))

    # --- hot-swapping (`SwapsRank`: deltatune.prepare_hotswap, deltatune.hotswap_adapter) --------------------
    @torch.no_grad()
    def pad_to_rank(self, max_rank: int) -> None:
        """Zero-pad A to (max_rank, ...) rows and B to max_rank columns: the extra rank components add exact
        zeros. The config becomes the equivalent one at rank max_rank (alpha rescaled to keep the scale), so a
        save of the padded adapter is a valid LoRA with the same outputs."""
        if self.patterned:
            raise HotSwapError(f"the LoRA on {self.module_name or 'this layer'} has a per-layer rank or alpha "
                               "(rank_pattern / alpha_pattern), which hot-swapping does not support; load the "
                               "adapters with deltatune.load_adapter under separate names instead")
        rank, limit = self.lora_A.shape[0], min(self.layer.fan_in, self.layer.out_features)
        allowed = f"{rank} <= max_rank < {limit}" if "rank" in self.hot_swappable_fields else f"{rank} (fixed)"
        config_check(isinstance(max_rank, int) and (max_rank == rank or "rank" in self.hot_swappable_fields)
                     and rank <= max_rank < limit, "max_rank", max_rank, f"{allowed} for {self.module_name!r}")
        down = self.lora_A.new_zeros((max_rank, *self.lora_A.shape[1:]))
        up = self.lora_B.new_zeros((self.lora_B.shape[0], max_rank, *self.lora_B.shape[2:]))
        down[:rank], up[:, :rank] = self.lora_A, self.lora_B
        self.lora_A = nn.Parameter(down, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(up, requires_grad=self.lora_B.requires_grad)
        self.config = _at_rank(self.config, max_rank)
        self.swap_capacity = max_rank

    def check_swap(self, config: LoRAConfig, tensors: dict[str, Tensor]) -> None:
        """The saved (lora_A, lora_B[, lora_bias]) of a rank ≤ max_rank adapter on this same layer."""
        where = self.module_name or "this layer"
        if self.swap_capacity is None:
            raise HotSwapError(f"the LoRA on {where} is not prepared for hot-swapping; call "
                               "deltatune.prepare_hotswap(model, name, max_rank=...) first (before torch.compile)")
        if config.rank_pattern or config.alpha_pattern:
            raise HotSwapError("the new adapter has a per-layer rank or alpha (rank_pattern / alpha_pattern), "
                               "which hot-swapping does not support; load it with deltatune.load_adapter instead")
        rank = config.rank
        if rank > self.swap_capacity:
            raise HotSwapError(f"the new adapter's rank {rank} on {where} is above the prepared max_rank "
                               f"{self.swap_capacity}; prepare with deltatune.prepare_hotswap(..., max_rank={rank})")
        expected = {"lora_A": (rank, *self.lora_A.shape[1:]),
                    "lora_B": (self.lora_B.shape[0], rank, *self.lora_B.shape[2:])}
        if self.config.bias:
            expected["lora_bias"] = tuple(self.lora_bias.shape)
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise HotSwapError(f"tensor {key!r} for {where} has shape {tuple(tensors[key].shape)}, expected "
                                   f"{shape}: the adapter was saved for another model or layer")

    @torch.no_grad()
    def swap_in(self, config: LoRAConfig, tensors: dict[str, Tensor]) -> None:
        rank = config.rank
        self.lora_A.zero_()[:rank].copy_(tensors["lora_A"])
        self.lora_B.zero_()[:, :rank].copy_(tensors["lora_B"])
        if self.config.bias:
            self.lora_bias.copy_(tensors["lora_bias"])
        self.scale.fill_(config.scale)
        self.config = _at_rank(config, self.swap_capacity)

    def peft_tensor_names(self) -> dict[str, str]:
        if self.layer.kind == EMBEDDING:
            config_check(not self.config.bias, "bias", self.config.bias,
                         f"False for a peft export of embedding {self.module_name!r} (peft has no embedding lora_bias)",
                         "save with format='deltatune'")
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}
        names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
        return names | ({"lora_bias": "lora_B.bias"} if self.config.bias else {})


def _at_rank(config: LoRAConfig, rank: int) -> LoRAConfig:
    """The config of the same update at a (zero-padded) higher rank: alpha rescaled so that the scale is equal."""
    if rank == config.rank:
        return config
    alpha = config.scale * (math.sqrt(rank) if config.rslora else rank)
    return dataclasses.replace(config, rank=rank, alpha=alpha)


def _fusable(delta: LoRADelta, x: Tensor, base_layer: nn.Module) -> bool:
    """True when base_layer(x) is exactly F.linear on its (out, in) weight matrix and every tensor shares x's dtype."""
    kind = delta.layer.kind
    plain = type(base_layer) is nn.Linear if kind == LINEAR else kind == CONV1D_HF and is_hf_conv1d(base_layer)
    if not plain or "forward" in base_layer.__dict__ or _has_hooks(base_layer):
        return False
    if torch.is_autocast_enabled(x.device.type):  # autocast picks each op's dtype; the unfused path follows it
        return False
    bias = base_layer.bias
    return x.dtype == base_layer.weight.dtype == delta.lora_A.dtype and (bias is None or bias.dtype == x.dtype)


def _has_hooks(module: nn.Module) -> bool:
    """Hooks on the base layer itself, which module.__call__ would run and the fused path does not go through.
    Process-wide hooks (`torch.nn.modules.module.register_module_forward_hook`) still see the adapted layer,
    whose output is the same either way; torch offers no public way to ask for them, so they are not consulted."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _dense_path(delta: LoRADelta, x: Tensor) -> Tensor:
    return F.linear(F.linear(x, delta.lora_A), delta.lora_B)


def _conv_path(delta: LoRADelta, x: Tensor) -> Tensor:
    conv = (F.conv1d, F.conv2d, F.conv3d)[delta.layer.conv_dims - 1]
    return conv(conv(x, delta.lora_A, **delta.layer.conv_args), delta.lora_B)


def _embedding_path(delta: LoRADelta, x: Tensor) -> Tensor:
    return F.embedding(x, delta.lora_A.T, **delta.layer.embedding_args) @ delta.lora_B.T


_LOWRANK_PATH = {"linear": _dense_path, "conv1d_hf": _dense_path, CONV: _conv_path, EMBEDDING: _embedding_path}


def lowrank_factors(layer: LayerInfo, rank: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Uninitialized (A, B) in the layer's native layout: A (r, in) and B (out, r); for a convolution A is
    (r, in/groups, *kernel) and B a 1x1 convolution (out, r, 1, ...), as peft stores them."""
    if layer.kind == CONV:
        return (nn.Parameter(torch.empty(rank, *layer.weight_shape[1:])),
                nn.Parameter(torch.empty(layer.out_features, rank, *([1] * layer.conv_dims))))
    return nn.Parameter(torch.empty(rank, layer.in_features)), nn.Parameter(torch.empty(layer.out_features, rank))


def _check_layer(config: LoRAConfig, layer: LayerInfo, module_name: str) -> None:
    if layer.kind == CONV and layer.conv_args.get("groups", 1) != 1:
        raise UnsupportedLayerError(
            f"lora cannot adapt grouped convolution {module_name!r} (groups={layer.conv_args['groups']}); "
            "exclude it from `targets`"
        )
    limit = min(layer.fan_in, layer.out_features)
    config_check(
        config.rank < limit, "rank", config.rank,
        f"0 < rank < min(in, out) = {limit} for {module_name or layer.type_name} "
        f"({layer.fan_in} -> {layer.out_features})",
        "lower the rank or exclude this module",
    )

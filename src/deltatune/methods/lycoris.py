"""What LoHa (`methods.loha`) and LoKr (`methods.lokr`) share: the LyCORIS delta base class (layer checks, the
forward with peft's module and rank dropout) and the classification of peft's LoHaConfig / LoKrConfig fields.

Each field of peft's LoHaConfig / LoKrConfig is in exactly one table (a test walks both dataclasses):
`HONOURED` (reproduced; the value says how), `REFUSED_UNLESS` (any value but the given default is refused by
name), `IRRELEVANT` (no effect on a loaded adapter's outputs). Which modules are adapted comes from the file's
tensors, as for LoRA (`methods.lora_peft`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.fields import Mismatch, conform, describe
from deltatune.core.layers import CONV, LINEAR, LayerInfo
from deltatune.errors import ConfigError, UnsupportedLayerError, config_check
from deltatune.functional.lycoris import output_row_dropout
from deltatune.methods.lora_peft import TASK_TYPES

TARGETING = "the adapted modules are the ones the file has tensors for"
HONOURED_COMMON = {
    "peft_type": "selects the method", "r": "rank", "alpha": "alpha", "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout", "use_effective_conv2d": "effective_conv2d", "target_modules": TARGETING,
    "exclude_modules": TARGETING, "layers_to_transform": TARGETING, "layers_pattern": TARGETING,
    "modules_to_save": "extra_trainable: the listed modules the file holds tensors for",
}
HONOURED_LOKR_ONLY = {
    "decompose_both": "decompose_both", "decompose_factor": "decompose_factor",
    "rank_dropout_scale": "rank_dropout_scale",
}
REFUSED_UNLESS: dict[str, Any] = {"rank_pattern": {}, "alpha_pattern": {}}
IRRELEVANT = {
    "task_type": "picks peft's model wrapper class; the head modules it implies are listed in modules_to_save",
    "auto_mapping": "names the class peft would build the base model with; deltatune is given the model",
    "peft_version": "provenance only",
    "base_model_name_or_path": "provenance only: deltatune loads onto the model it is given",
    "revision": "provenance only: the base model's hub revision",
    "inference_mode": "peft's trainable flag; load_adapter's `trainable` argument decides",
    "init_weights": "only chooses the starting factors, which the file's tensors replace",
}
TYPES: dict[str, Any] = {
    "r": int, "alpha": float, "rank_dropout": float, "module_dropout": float, "use_effective_conv2d": bool,
    "decompose_both": bool, "decompose_factor": int, "rank_dropout_scale": bool, "modules_to_save": list[str] | None,
}


def honoured_fields(peft_type: str) -> dict[str, str]:
    return HONOURED_COMMON | (HONOURED_LOKR_ONLY if peft_type == "LOKR" else {})


def classified_fields(peft_type: str) -> set[str]:
    return set(honoured_fields(peft_type)) | set(REFUSED_UNLESS) | set(IRRELEVANT)


def check_peft_config(peft: dict[str, Any], peft_type: str) -> None:
    """Refuse by name every value of a peft LoHa/LoKr config that deltatune cannot reproduce; check types."""
    label = "LoHa" if peft_type == "LOHA" else "LoKr"
    for name, hint in TYPES.items():
        if name in peft and name in classified_fields(peft_type):
            try:
                conform(peft[name], hint)
            except Mismatch:
                raise ConfigError(f"peft field {name}={peft[name]!r} is invalid: expected {describe(hint)}; "
                                  "fix adapter_config.json") from None
    task = peft.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise ConfigError(f"peft field task_type={task!r} is invalid: expected None or one of {list(TASK_TYPES)}; "
                          "fix adapter_config.json")
    for name, default in REFUSED_UNLESS.items():
        if peft.get(name) not in (None, default):
            raise ConfigError(f"this peft {label} folder sets {name}={peft[name]!r}, which deltatune's {label} cannot "
                              f"reproduce (only {default!r} is supported); load it with peft, or re-train without it")
    unknown = sorted(k for k in peft if k not in classified_fields(peft_type) and peft[k] not in (None, False, {}, []))
    if unknown:
        raise ConfigError(f"this peft {label} folder sets field {unknown[0]!r}={peft[unknown[0]]!r}, which deltatune "
                          "does not know (written by a newer peft, or another method's field?); load it with peft")


def peft_targets(keys: Iterable[str], names: tuple[str, ...], label: str) -> tuple[list[str], list[str]]:
    """(adapted module paths, other keys) of a peft file whose delta tensors end in `.<name>`."""
    suffixes = tuple(f".{name}" for name in names)
    keys = list(keys)
    targets = sorted({key.rsplit(".", 1)[0] for key in keys if key.endswith(suffixes)})
    if not targets:
        raise ConfigError(f"this peft {label} folder holds no {label} tensors ({', '.join(names)}); it adapts nothing")
    return targets, [key for key in keys if not key.endswith(suffixes)]


def saved_modules(peft: dict[str, Any], other_keys: list[str]) -> tuple[str, ...]:
    """peft's modules_to_save that the file holds tensors for (its SEQ_CLS default lists two head names)."""
    listed = peft.get("modules_to_save") or []
    listed = [listed] if isinstance(listed, str) else listed
    return tuple(name for name in listed if any(f".{name}." in f".{key}" for key in other_keys))


def common_peft_fields(config: Any, target_paths: list[str], extra_paths: list[str]) -> dict[str, Any]:
    return {
        "r": config.rank, "alpha": config.alpha, "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout, "use_effective_conv2d": config.effective_conv2d,
        "target_modules": sorted(target_paths), "modules_to_save": sorted(extra_paths) or None,
        "exclude_modules": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "task_type": None, "inference_mode": True,
        "base_model_name_or_path": None, "revision": None,
    }


def common_config_fields(peft: dict[str, Any], keys: Iterable[str], names: tuple[str, ...],
                         label: str) -> dict[str, Any]:
    """The config fields LoHa and LoKr share, read from a peft folder's config and tensor keys (the inverse of
    `common_peft_fields`); the adapted modules are the ones the file holds `names` tensors for."""
    targets, others = peft_targets(keys, names, label)
    return {"rank": peft.get("r", 8), "alpha": peft.get("alpha", 8.0), "rank_dropout": peft.get("rank_dropout", 0.0),
            "module_dropout": peft.get("module_dropout", 0.0),
            "effective_conv2d": peft.get("use_effective_conv2d", False), "targets": tuple(targets),
            "extra_trainable": saved_modules(peft, others)}


def check_lycoris_fields(config: Any) -> None:
    """The fields LoHa and LoKr share."""
    config_check(isinstance(config.rank, int) and config.rank > 0, "rank", config.rank, "an integer > 0")
    config_check(config.alpha > 0, "alpha", config.alpha, "a number > 0")
    config_check(0 <= config.rank_dropout < 1, "rank_dropout", config.rank_dropout, "a probability in [0, 1)")
    config_check(0 <= config.module_dropout < 1, "module_dropout", config.module_dropout, "a probability in [0, 1)")


class LycorisDelta(Delta):
    """An update ΔW built from small factors (LoHa, LoKr), added on the activation path as the layer's own op
    run with ΔW (what peft runs: base(x) + op(x, ΔW)). Subclasses build `update()` in the native weight shape."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = frozenset({LINEAR, CONV})
    rescales_rank_dropout: ClassVar[bool] = True

    def __init__(self, config: Any, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__(config, layer, module_name)
        if layer.kind == CONV and layer.conv_dims == 3:
            raise UnsupportedLayerError(
                f"{config.method} cannot adapt {module_name!r} ({layer.type_name}); it supports nn.Linear, nn.Conv1d "
                "and nn.Conv2d (as peft and LyCORIS do). Remove it from `targets` or add it to `exclude`."
            )
        self.register_buffer("scale", torch.tensor(config.alpha / config.rank, dtype=torch.float64), persistent=False)

    @property
    def uses_tucker(self) -> bool:
        """LyCORIS's "effective conv2d": a Tucker core over the kernel, except for 1 (x 1) kernels (as peft)."""
        return self.config.effective_conv2d and self.layer.kind == CONV and math.prod(self.layer.kernel_size) != 1

    def update(self) -> Tensor:
        raise NotImplementedError

    def _rescales(self) -> bool:
        return self.rescales_rank_dropout

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.config.module_dropout > 0 and float(torch.rand(1)) <= self.config.module_dropout:
            return torch.zeros((), dtype=x.dtype, device=x.device)  # the whole update skipped this step
        weight = self.update()
        if self.training and self.config.rank_dropout > 0:
            weight = output_row_dropout(weight, self.config.rank_dropout, self._rescales())
        return self.layer.op(x.to(weight.dtype), weight, None).to(x.dtype)

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self.update().to(base_weight.dtype)

    def peft_tensor_names(self) -> dict[str, str]:
        """peft's names are LyCORIS's, which deltatune keeps: the keys are ``<module>.<name>``."""
        return {name: name for name, _ in self.named_parameters(recurse=False)}


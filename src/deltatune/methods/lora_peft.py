"""peft's LoraConfig (adapter_config.json) read as a deltatune LoRAConfig: every field honoured or refused.

Each field of peft's `LoraConfig` is in exactly one table below (a test walks peft's dataclass fields, so a field
a later peft adds fails the suite until it is classified here):

- `HONOURED`: deltatune reproduces its effect (the value says how);
- `REFUSED_UNLESS`: deltatune cannot reproduce it, so any value but peft's default (given here) is refused by name;
- `IRRELEVANT`: no effect on the loaded adapter's outputs (the value says why).

Which modules get a LoRA comes from the file's tensors, not from `target_modules` (peft saves a ``lora_A`` and
``lora_B`` for exactly the modules it adapted), so `target_modules`, `exclude_modules`, `layers_to_transform` and
`layers_pattern` are honoured whatever matching rules produced them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from deltatune.core.fields import Mismatch, conform, describe
from deltatune.errors import ConfigError, config_check

HONOURED = {
    "peft_type": "selects the method (LORA)",
    "use_dora": "True selects DoRA (`methods.dora`); lora_magnitude_vector is its magnitude",
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_rslora": "rslora",
    "lora_bias": "bias (Δb = scale · lora_B.bias, as peft scales it)",
    "target_modules": "the adapted modules are the ones the file has LoRA tensors for",
    "exclude_modules": "as target_modules",
    "layers_to_transform": "as target_modules",
    "layers_pattern": "as target_modules",
    "modules_to_save": "extra_trainable: the listed modules the file holds tensors for (peft's SEQ_CLS default "
                       "lists both 'classifier' and 'score'; a model has one)",
    "init_lora_weights": "initializations that leave the base weights alone only choose the starting A and B, "
                         "which the file's trained tensors replace; 'pissa' and 'olora' select those methods, whose "
                         "residual is rebuilt from the base as peft rebuilds it; the others are refused "
                         "(see REWRITES_BASE)",
    "eva_config": "EVA's settings act at initialization only; its rank redistribution is written to "
                  "rank_pattern and its scale adjustment to alpha_pattern, both honoured",
    "rank_pattern": "rank_pattern, matched by peft's rule (`pattern_value` below)",
    "alpha_pattern": "alpha_pattern, matched by peft's rule (`pattern_value` below)",
}

REFUSED_UNLESS: dict[str, Any] = {
    "bias": "none",
    "target_parameters": None, "trainable_token_indices": None, "megatron_config": None, "loftq_config": {},
    "corda_config": None, "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None,
    "use_qalora": False, "monteclora_config": None, "layer_replication": None, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "ensure_weight_tying": False,
}

IRRELEVANT = {
    "task_type": "picks peft's model wrapper class; the head modules it implies are listed in modules_to_save",
    "auto_mapping": "names the class peft would build the base model with; deltatune is given the model",
    "peft_version": "provenance only",
    "base_model_name_or_path": "provenance only: deltatune loads onto the model it is given",
    "revision": "provenance only: the base model's hub revision",
    "inference_mode": "peft's trainable flag; load_adapter's `trainable` argument decides",
    "fan_in_fan_out": "peft only transposes ΔW with it when merging into a base that stores (in, out) weights "
                      "(transformers Conv1D); deltatune reads the layout from the layer itself",
    "megatron_core": "the module peft imports for megatron_config, which is refused unless None",
    "qalora_group_size": "read only with use_qalora, which is refused unless False",
    "runtime_config": "runtime settings peft never saves (GPU offload)",
}

# peft's spelling of the fields deltatune reads, with the types its files must use.
TYPES: dict[str, Any] = {
    "r": int, "lora_alpha": float, "use_dora": bool, "lora_dropout": float, "use_rslora": bool, "lora_bias": bool,
    "modules_to_save": list[str] | None, "init_lora_weights": bool | str, "eva_config": dict | None,
    "rank_pattern": dict[str, int] | None, "alpha_pattern": dict[str, float] | None,
}

# peft's TaskType values: an irrelevant field, but another value means the file is not peft's (peft refuses it)
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
RESIDUAL_INITS = ("pissa", "olora")  # their own methods (methods.pissa, methods.olora): the residual is rebuilt
_CONVERSION = ("convert it to a plain LoRA of the original base in peft first: PeftModel.save_pretrained(out, "
               "path_initial_model_for_weight_conversion=<the initial adapter folder>)")
# init family -> (name, what it does to the base, the fix)
REWRITES_BASE = {
    "pissa": ("PiSSA (randomized SVD)", "subtracts a randomized, unseeded SVD of the base weights, which cannot be "
              "rebuilt exactly,", _CONVERSION),
    "corda": ("CorDA", "subtracts the initial adapter (context-oriented SVD) from the base weights", _CONVERSION),
    "lora_ga": ("LoRA-GA", "subtracts the initial adapter (gradient SVD) from the base weights", _CONVERSION),
    "loftq": ("LoftQ", "replaces the base weights by their quantized approximation",
              "load it with peft onto the LoftQ base model it was trained with"),
}
OTHER_INITS = {"mica": "MiCA keeps lora_B frozen in training, which deltatune's LoRA does not"}


def classified_fields() -> set[str]:
    return set(HONOURED) | set(REFUSED_UNLESS) | set(IRRELEVANT)


# peft's LoRA variants that are their own deltatune method: a field's value -> the method's registered name
VARIANT_METHODS = {("use_dora", True): "dora", ("init_lora_weights", "pissa"): "pissa",
                   ("init_lora_weights", "olora"): "olora"}


def peft_variant_method(peft: dict[str, Any]) -> str:
    """The registered method a peft LoRA folder loads as ("lora" unless a variant field selects another)."""
    chosen = [method for (field, value), method in VARIANT_METHODS.items()
              if peft.get(field) == value and type(peft.get(field)) is type(value)]
    if len(chosen) > 1:
        raise ConfigError(f"this peft LoRA folder combines {' and '.join(chosen)}, which deltatune does not "
                          "reproduce together; load it with peft")
    return chosen[0] if chosen else "lora"


def check_peft_lora_config(peft: dict[str, Any]) -> None:
    """Refuse, by field name, every value deltatune's LoRA cannot reproduce; check the types of the rest."""
    for name, hint in TYPES.items():
        if name in peft:
            try:
                conform(peft[name], hint)
            except Mismatch:
                raise ConfigError(f"peft field {name}={peft[name]!r} is invalid: expected {describe(hint)}; "
                                  "fix adapter_config.json") from None
    task = peft.get("task_type")
    if task is not None and not (isinstance(task, str) and task in TASK_TYPES):
        raise ConfigError(f"peft field task_type={task!r} is invalid: expected None or one of {list(TASK_TYPES)} "
                          "(peft's TaskType; written by a newer peft?); fix adapter_config.json")
    used = [name for name, default in REFUSED_UNLESS.items() if name in peft and not _is_default(peft[name], default)]
    if used:
        name = used[0]
        raise ConfigError(f"this peft LoRA folder sets {name}={peft[name]!r}, which deltatune's LoRA cannot "
                          f"reproduce (only {REFUSED_UNLESS[name]!r} is supported); load it with peft, or re-train "
                          "without it")
    unknown = sorted(k for k in peft if k not in classified_fields() and _is_on(peft[k]))
    if unknown:
        raise ConfigError(f"this peft LoRA folder sets field {unknown[0]!r}={peft[unknown[0]]!r}, which deltatune "
                          "does not know (written by a newer peft?); load it with peft")
    _check_init(peft.get("init_lora_weights", True))


def _is_default(value: Any, default: Any) -> bool:
    """peft writes an unset field as its default or as None. Another type is not the default:
    `alpha_pattern: []`, `arrow_config: []` are refused (peft itself fails on them)."""
    return value is None or (value == default and type(value) is type(default))


def _is_on(value: Any) -> bool:
    """A field peft added after this table was written is taken as off at None, False or empty."""
    return value not in (None, False, {}, [], "")


def _check_init(init: bool | str) -> None:
    if any(init == plain and type(init) is type(plain) for plain in PLAIN_INITS + RESIDUAL_INITS):
        return
    family = init.split("_niter_")[0] if isinstance(init, str) else init
    if family in REWRITES_BASE:
        name, change, fix = REWRITES_BASE[family]
        raise ConfigError(f"this peft LoRA folder has init_lora_weights={init!r}: {name} {change}, so its A and B "
                          f"are only right on that changed base, not on this model; {fix}")
    reason = OTHER_INITS.get(family, f"supported: {list(PLAIN_INITS)}")
    raise ConfigError(f"this peft LoRA folder has init_lora_weights={init!r}, which deltatune's LoRA does not "
                      f"reproduce ({reason}); load it with peft")


V = TypeVar("V")


def pattern_value(patterns: Mapping[str, V], module_name: str, default: V) -> V:
    """peft's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`): the value of the first
    key, in the mapping's order, that matches the module's dotted path as a whole suffix after a dot, read as a
    regular expression (``re.match(rf"(.*\\.)?({key})$", module_name)``); else the value stored under the path
    itself; else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return patterns.get(module_name, default)


def check_pattern(patterns: Mapping[str, Any], field: str, what: str, valid: Any) -> None:
    """Every key of a rank_pattern / alpha_pattern compiles as peft compiles it, every value passes `valid`."""
    for key, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as error:
            raise ConfigError(f"{field} key {key!r} is not a valid regular expression: {error}; escape it or fix "
                              "the pattern") from None
        config_check(valid(value), field, dict(patterns), f"a mapping of module patterns to {what} > 0 "
                     f"(the value of {key!r} is {value!r})")

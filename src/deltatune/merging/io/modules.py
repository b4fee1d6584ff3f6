"""Which modules a safetensors checkpoint holds, and of what kind (Linear, embedding, output head, other).

Used by `deltatune.merging.extract` to decide what becomes a LoRA and what is saved whole (see its docstring for the
rules: a meta-device transformers model when needed, name and shape rules otherwise).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.merging.io.checkpoint import Checkpoint
from deltatune.merging.io.validate import read_model_config

LINEAR, EMBEDDING, HEAD, OTHER = "linear", "embedding", "head", "other"
EMBEDDING_HINTS = ("embed", "wte", "wpe")
# model_type values whose every 2-D weight outside embed_tokens / lm_head is an nn.Linear and every other float
# tensor a norm weight: the name rules are exact for them (transformers' modeling files of these families)
NAME_RULE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Module:
    """One module of a checkpoint: its path, kind and the names of its weight and bias tensors."""

    path: str
    kind: str
    weight: str | None
    bias: str | None


def _module_kinds(folder: Path | None) -> dict[str, str] | None:
    """Module path -> kind from a meta-device model built from config.json (None when that is not possible)."""
    config_file = folder / "config.json" if folder else None
    if config_file is None or not config_file.is_file():
        return None
    model_config = read_model_config(config_file)
    architectures = model_config.get("architectures")
    if model_config.get("model_type") in NAME_RULE_FAMILIES:
        return None
    try:
        import transformers
        from torch import nn

        config = transformers.AutoConfig.from_pretrained(str(folder))
        model_class = getattr(transformers, architectures[0])
        with torch.device("meta"):
            model = model_class(config)
    except Exception:  # an unknown or custom architecture: the name/shape rules below decide
        return None
    head = model.get_output_embeddings()
    kinds = {}
    for path, module in model.named_modules():
        if module is model.get_input_embeddings() or isinstance(module, nn.Embedding):
            kinds[path] = EMBEDDING
        elif head is not None and module is head:
            kinds[path] = HEAD if type(module) is nn.Linear else OTHER
        elif type(module) is nn.Linear:
            kinds[path] = LINEAR
        elif getattr(module, "weight", None) is not None or getattr(module, "bias", None) is not None:
            kinds[path] = OTHER
    return kinds


def _guess_kind(path: str, weight_shape: tuple[int, ...] | None) -> str:
    if weight_shape is None or len(weight_shape) != 2:
        return OTHER
    last = path.rsplit(".", 1)[-1].lower()
    if last == "lm_head":
        return HEAD
    return EMBEDDING if any(hint in last for hint in EMBEDDING_HINTS) else LINEAR


def plan_modules(finetuned: Checkpoint) -> list[Module]:
    """The fine-tune's modules with float weights or biases, in file order, each with its kind."""
    kinds = _module_kinds(finetuned.folder)
    grouped: dict[str, dict[str, str]] = {}
    for name in finetuned.names_in_file_order():
        path, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and finetuned.tensors[name].dtype.is_floating_point:
            grouped.setdefault(path, {})[leaf] = name
    modules = []
    for path, parts in grouped.items():
        weight = parts.get("weight")
        shape = finetuned.tensors[weight].shape if weight else None
        kind = kinds.get(path) if kinds is not None else None
        modules.append(Module(path, kind or _guess_kind(path, shape), weight, parts.get("bias")))
    return modules


def targeted(path: str, targets: tuple[str, ...] | str | None) -> bool:
    """deltatune's targeting rules: names match a path or its suffix after a dot; a string is a full-match regex."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == name or path.endswith("." + name) for name in targets)

"""kohya / A1111 LoRA files (sd-scripts' ``networks/lora.py``; LyCORIS's LoHa/LoKr files use the same grammar),
as the "kohya" entry of the format table (`deltatune.core.formats`).

A kohya file is one ``.safetensors`` file. Each adapted module has a *kohya name*: a prefix naming the model
(``lora_unet_`` for the denoiser, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders) followed by the
module's dotted path with every ``.`` replaced by ``_``:

    lora_unet_down_blocks_0_attentions_0_to_q.lora_down.weight   (r, in)   — (r, in, *kernel) for a convolution
    lora_unet_down_blocks_0_attentions_0_to_q.lora_up.weight     (out, r)  — (out, r, 1, 1) for a convolution
    lora_unet_down_blocks_0_attentions_0_to_q.alpha              ()        ΔW = (alpha / r) · up · down

(sd-scripts: an alpha of 0 or a missing alpha means alpha = r.) These are deltatune's (and peft's) LoRA tensors
under other names: ``lora_down`` is ``lora_A``, ``lora_up`` is ``lora_B``. The methods a kohya file can hold are
the `KINDS` table's (each a registered method with a peft conversion: LoRA here, LyCORIS's LoHa and LoKr in
`core.kohya_lycoris`); a load rebuilds the method config through
the method's own `from_peft_config`, so every field is honoured or refused there.

Underscored names are resolved against the model's real module paths: a name that no module has, or that two
modules share (``a_b.c`` and ``a.b_c``), is refused by name. A file adapts one model: a file holding several
prefixes (an SD LoRA with UNet and text-encoder parts) is loaded one part at a time with
``load_kohya_adapter(model, path, prefix="lora_unet_")``.

A save writes one file, through a temporary file renamed over it; an existing file is replaced only when
deltatune's kohya save wrote it. The file carries kohya's metadata (``ss_network_module``, ``ss_network_dim``,
``ss_network_alpha``). Deviations: deltatune's adapters have one rank and one alpha, so a file whose modules
differ in either is refused (by name); rsLoRA (scale alpha/√r) is written as the kohya alpha α·√r with the same
ΔW; training-only fields (dropout, init) are not stored, and a load gets their defaults.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.attach import attach_adapter
from deltatune.core.blueprint import planned_layers
from deltatune.core.capabilities import PeftConvertibleConfig
from deltatune.core.config import DeltaConfig
from deltatune.core.files import read_safetensors, refuse_nonfinite
from deltatune.core.foreign_format import (
    exact_targets,
    header,
    one_value,
    refuse_extras,
    refuse_foreign_overwrite,
    warn_statistics_left_out,
    write_weights,
)
from deltatune.core.formats import AdapterFormat, AdapterLocation, register_format
from deltatune.core.model import _config_of, iter_deltas
from deltatune.core.peft_format import peft_key_renames
from deltatune.core.registry import entry_for_config, method_entry
from deltatune.core.targets import candidate_layers
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError

FORMAT_NAME = "kohya"
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_")
ALPHA = "alpha"
SUFFIX = ".safetensors"
FOLDER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' file name, which also holds kohya files


@dataclass(frozen=True)
class KohyaKind:
    """One method a kohya file can hold: its registered name, its peft type and alpha field (the load goes
    through the method's `from_peft_config`), kohya suffix -> peft suffix of its tensors, and the peft config
    fields a file's modules imply (rank, alpha, forms), which `fields` reads."""

    method: str
    peft_type: str
    network_module: str
    tensors: dict[str, str]
    # (modules: kohya name -> {suffix: tensor}, base weight shape per kohya name, source) -> peft config fields
    fields: Callable[[dict[str, dict[str, Tensor]], dict[str, tuple[int, ...]], Path], dict[str, Any]]
    alpha_field: str = "alpha"  # the peft config field that holds alpha
    # the alpha to write for one module, from the adapter's (rank, alpha) and that module's tensor suffixes
    file_alpha: Callable[[int, float, set[str], str], float] = lambda rank, alpha, suffixes, where: alpha

    def claims(self, suffixes: set[str]) -> bool:
        return bool(suffixes & set(self.tensors))


def saved_alpha(group: dict[str, Tensor], rank: int) -> float:
    """A module's alpha as sd-scripts and LyCORIS read it: a missing or zero alpha means alpha = rank."""
    alpha = float(group[ALPHA].double()) if ALPHA in group else 0.0
    return alpha if alpha != 0 else float(rank)


def _lora_fields(modules: dict[str, dict[str, Tensor]], shapes: dict[str, tuple[int, ...]], source: Path
                 ) -> dict[str, Any]:
    ranks = {name: int(group["lora_down.weight"].shape[0]) for name, group in modules.items()}
    rank = int(one_value(ranks, "the rank", source, "split the file into one adapter per rank"))
    alphas = {name: saved_alpha(group, rank) for name, group in modules.items()}
    alpha = one_value(alphas, "alpha", source, "split the file into one adapter per alpha")
    return {"r": rank, "lora_alpha": alpha}


KINDS: dict[str, KohyaKind] = {}


def register_kind(kind: KohyaKind) -> KohyaKind:
    KINDS[kind.peft_type] = kind
    return kind


register_kind(KohyaKind("lora", "LORA", "networks.lora",
                        {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}, _lora_fields,
                        alpha_field="lora_alpha"))


# --- detect ---------------------------------------------------------------------------------------------------
def kohya_file(location: AdapterLocation) -> Path | None:
    """The file a location names: the file itself, or a folder's diffusers-named file."""
    if location.file is not None:
        return location.file
    return location.folder / FOLDER_FILE if FOLDER_FILE in location.names else None


def is_kohya_keys(keys: list[str]) -> bool:
    """Every key is ``<prefix><name>.<suffix>`` with an underscored name, and one suffix is a known tensor."""
    known = {suffix for kind in KINDS.values() for suffix in kind.tensors}
    if not keys:
        return False
    for key in keys:
        name, _, suffix = key.partition(".")
        if not suffix or not name.startswith(PREFIXES):
            return False
    return any(key.partition(".")[2] in known for key in keys)


def detect_kohya(location: AdapterLocation) -> bool:
    path = kohya_file(location)
    if path is None or path.suffix != SUFFIX:
        return False
    found = header(path)
    return found is not None and is_kohya_keys(found[0])


# --- load -----------------------------------------------------------------------------------------------------
def load_kohya_adapter(model: nn.Module, location: AdapterLocation | str | os.PathLike, name: str = "default", *,
                       trainable: bool = False, allow_nonfinite: bool = False, prefix: str | None = None
                       ) -> nn.Module:
    """Load a kohya/LyCORIS file onto `model` as adapter `name`; `prefix` picks one part of a file that adapts
    several models (``"lora_unet_"``); the model is unchanged on any error."""
    path = kohya_file(location) if isinstance(location, AdapterLocation) else Path(location)
    raw = read_safetensors(path)
    if not allow_nonfinite:
        refuse_nonfinite(raw, path)
    modules, prefix = _modules(raw, path, prefix)
    kind = _kind_of(modules, path)
    paths = resolve_module_names(model, modules, prefix, path)
    peft_tensors: dict[str, Tensor] = {}
    for kohya_name, group in modules.items():
        for suffix, tensor in group.items():
            if suffix != ALPHA:
                peft_tensors[f"{paths[kohya_name]}.{kind.tensors[suffix]}"] = tensor
    shapes = _weight_shapes(model, paths, path)
    try:
        fields = kind.fields(modules, shapes, path)
    except KeyError as missing:  # a module without the tensor its rank or form is read from
        raise AdapterFileError(f"{path}: a {kind.method} module lacks its {missing.args[0]!r} tensor; the file is "
                               "incomplete (re-export it with the tool that wrote it)") from None
    config = _config_from_file(model, kind, fields, peft_tensors, list(paths.values()), path)
    renames: dict[str, str] = {}
    for module_path, layer in planned_layers(model, config):
        renames |= peft_key_renames(config, module_path, layer)
    tensors = {renames.get(key, key): tensor for key, tensor in peft_tensors.items()}
    return attach_adapter(model, config, tensors, name, trainable, source=path)


def _config_from_file(model: nn.Module, kind: KohyaKind, fields: dict[str, Any], peft_tensors: dict[str, Tensor],
                      paths: list[str], source: Path) -> DeltaConfig:
    config_cls = method_entry(kind.method).config_cls
    try:
        config = config_cls.from_peft_config({"peft_type": kind.peft_type, **fields}, list(peft_tensors))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return exact_targets(model, config, paths)


def _modules(raw: dict[str, Tensor], source: Path, prefix: str | None) -> tuple[dict[str, dict[str, Tensor]], str]:
    """kohya name -> {suffix: tensor}, of the file's one prefix (or the given one)."""
    found = sorted({_prefix_of(key, source) for key in raw})
    if not found:
        raise AdapterFileError(f"{source} holds no tensors; it adapts nothing")
    if prefix is None:
        if len(found) > 1:
            raise AdapterFileError(f"{source} adapts several models ({', '.join(found)}); load one part with "
                                   f"deltatune.core.kohya_format.load_kohya_adapter(model, path, prefix={found[0]!r})")
        prefix = found[0]
    elif prefix not in found:
        raise AdapterFileError(f"{source} has no modules with prefix {prefix!r}; its prefixes: {', '.join(found)}")
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in raw.items():
        kohya_name, _, suffix = key.partition(".")
        if _prefix_of(key, source) == prefix:
            modules.setdefault(kohya_name, {})[suffix] = tensor
    return modules, prefix


def _prefix_of(key: str, source: Path) -> str:
    name = key.partition(".")[0]
    matches = [p for p in PREFIXES if name.startswith(p)]
    if not matches or "." not in key:
        raise AdapterFileError(f"{source}: key {key!r} is not a kohya key (<{'|'.join(PREFIXES)}><module>.<tensor>); "
                               "the file was written by another tool")
    return max(matches, key=len)


def _kind_of(modules: dict[str, dict[str, Tensor]], source: Path) -> KohyaKind:
    """The one method whose tensors the file holds; unknown tensors refused by name."""
    kinds = set()
    for kohya_name, group in modules.items():
        suffixes = set(group) - {ALPHA}
        claimed = [kind for kind in KINDS.values() if kind.claims(suffixes)]
        unknown = sorted(suffixes - {s for kind in claimed for s in kind.tensors})
        if unknown or not claimed:
            what = unknown[0] if unknown else "only an alpha"
            raise AdapterFileError(
                f"{source}: {kohya_name!r} has {what!r}, which deltatune does not read (it reads "
                f"{', '.join(kind.method for kind in KINDS.values())} tensors: "
                f"{', '.join(s for kind in KINDS.values() for s in kind.tensors)})")
        kinds.update(kind.peft_type for kind in claimed)
    if len(kinds) > 1:
        raise AdapterFileError(f"{source} mixes {' and '.join(sorted(kinds))} modules; deltatune's adapters have "
                               "one method: split the file into one file per method")
    return KINDS[kinds.pop()]


def underscored_paths(model: nn.Module) -> dict[str, list[str]]:
    """Underscored module path -> the real module paths that give it (more than one: ambiguous)."""
    names: dict[str, list[str]] = {}
    for module_path, _ in candidate_layers(model):
        names.setdefault(module_path.replace(".", "_"), []).append(module_path)
    return names


def resolve_module_names(model: nn.Module, modules: dict[str, Any], prefix: str, source: Path) -> dict[str, str]:
    """kohya name -> the model's module path; an unknown or ambiguous name is refused by name."""
    names = underscored_paths(model)
    resolved = {}
    for kohya_name in modules:
        found = names.get(kohya_name[len(prefix):], [])
        if not found:
            raise AdapterFileError(f"{source}: {kohya_name!r} names no module of this model (as "
                                   f"{kohya_name[len(prefix):]!r} with '.' written '_'); was the file made for "
                                   "another model?")
        if len(found) > 1:
            raise AdapterFileError(f"{source}: {kohya_name!r} is ambiguous on this model: modules "
                                   f"{' and '.join(repr(p) for p in found)} both write as it; rename one module")
        resolved[kohya_name] = found[0]
    return resolved


def _weight_shapes(model: nn.Module, paths: dict[str, str], source: Path) -> dict[str, tuple[int, ...]]:
    """kohya name -> the shape of its base layer's weight (the factorization of LoKr files depends on it)."""
    bases = dict(candidate_layers(model))
    shapes = {}
    for kohya_name, module_path in paths.items():
        weight = getattr(bases[module_path], "weight", None)
        if not isinstance(weight, Tensor):
            raise AdapterFileError(f"{source}: {kohya_name!r} names {module_path!r}, a "
                                   f"{type(bases[module_path]).__name__} without a weight, which no LoRA adapts")
        shapes[kohya_name] = tuple(weight.shape)
    return shapes


# --- save -----------------------------------------------------------------------------------------------------
def default_prefix(model: nn.Module) -> str:
    """``lora_te_`` for a transformers model (the text encoder of SD pipelines), else ``lora_unet_``."""
    module = type(model).__module__ or ""
    return "lora_te_" if module.startswith("transformers.") else "lora_unet_"


def save_kohya_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                       prefix: str | None = None) -> Path:
    """Write adapter `name` as one kohya file at `path` (``*.safetensors``); `prefix` overrides
    `default_prefix`."""
    target = _target_file(Path(path))
    config = _config_of(model, name)
    kind = _writable_kind(config)
    refuse_extras(model, config, FORMAT_NAME)
    prefix = default_prefix(model) if prefix is None else prefix
    if prefix not in PREFIXES:
        raise DeltatuneError(f"prefix={prefix!r} is not a kohya prefix; use one of {', '.join(PREFIXES)}")
    deltas = list(iter_deltas(model, name))
    peft = config.to_peft_config([p for p, _, _ in deltas], [])
    rank, alpha = int(peft["r"]), float(peft[kind.alpha_field])
    if peft.get("use_rslora"):
        alpha *= math.sqrt(rank)  # kohya scales by alpha / r: alpha·√r / r is rsLoRA's alpha / √r
    tensors = _kohya_tensors(deltas, kind, prefix, rank, alpha)
    warn_statistics_left_out(model, FORMAT_NAME)
    metadata = {"format": "pt", "ss_network_module": kind.network_module, "ss_network_dim": str(rank),
                "ss_network_alpha": repr(alpha)}
    if kind.method != "lora":
        metadata["ss_network_args"] = json.dumps({"algo": kind.method})
    return write_weights(target, tensors, metadata, FORMAT_NAME)


def _writable_kind(config: DeltaConfig) -> KohyaKind:
    method = entry_for_config(config).name
    kind = KINDS.get(config.peft_type) if isinstance(config, PeftConvertibleConfig) else None
    if kind is None or kind.method != method:
        known = ", ".join(repr(kind.method) for kind in KINDS.values())
        raise DeltatuneError(f"method {method!r} has no kohya form (kohya files hold {known}); "
                             "save with format='deltatune'")
    return kind


def _target_file(path: Path) -> Path:
    if path.suffix != SUFFIX or path.is_dir():
        raise DeltatuneError(f"format='kohya' writes one file; pass a path ending in {SUFFIX}, not {str(path)!r}")
    refuse_foreign_overwrite(path, FORMAT_NAME)
    return path


def _kohya_tensors(deltas: list, kind: KohyaKind, prefix: str, rank: int, alpha: float) -> dict[str, Tensor]:
    back = {peft: kohya for kohya, peft in kind.tensors.items()}
    tensors: dict[str, Tensor] = {}
    written: dict[str, str] = {}
    for module_path, _, delta in deltas:
        kohya_name = prefix + module_path.replace(".", "_")
        if kohya_name in written:
            raise DeltatuneError(f"modules {written[kohya_name]!r} and {module_path!r} both write as kohya name "
                                 f"{kohya_name!r}, which no loader could tell apart; save with format='deltatune'")
        written[kohya_name] = module_path
        suffixes = set()
        for ours, theirs in delta.peft_tensor_names().items():
            if theirs not in back:
                raise DeltatuneError(f"{module_path}: tensor {ours!r} has no place in kohya files (they hold "
                                     f"{', '.join(kind.tensors)}); save with format='deltatune'")
            tensors[f"{kohya_name}.{back[theirs]}"] = getattr(delta, ours)
            suffixes.add(back[theirs])
        value = kind.file_alpha(rank, alpha, suffixes, module_path)
        exact32 = float(torch.tensor(value, dtype=torch.float32)) == value
        tensors[f"{kohya_name}.{ALPHA}"] = torch.tensor(value, dtype=torch.float32 if exact32 else torch.float64)
    return tensors


KOHYA_FORMAT = register_format(AdapterFormat(
    FORMAT_NAME, detect=detect_kohya, load=load_kohya_adapter, save=save_kohya_adapter,
))

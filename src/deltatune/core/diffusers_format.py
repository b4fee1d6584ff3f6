"""diffusers LoRA files (what `save_lora_weights` / `PeftAdapterMixin.save_lora_adapter` write and
`load_lora_weights` / `load_lora_adapter` read), as the "diffusers" entry of the format table
(`deltatune.core.formats`).

The file is ``pytorch_lora_weights.safetensors`` (in a folder, or any ``.safetensors`` file named directly):
peft's state dict of one adapter, each key prefixed by the pipeline component it adapts,

    unet.down_blocks.1.attentions.0.to_q.lora_A.weight      (r, in)
    unet.down_blocks.1.attentions.0.to_q.lora_B.weight      (out, r)

(prefixes ``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3``), and in the
safetensors metadata ``lora_adapter_metadata``: the JSON of the peft config with the same prefix on each field
(``{"unet.r": 4, "unet.lora_alpha": 8, ...}``). A model's own `save_lora_adapter` writes the same without any
prefix; such files load too (their keys are all peft LoRA keys). A file without that metadata follows
diffusers' rule for it: the rank is lora_B's second dimension and alpha = rank (scale 1). Tensor names and the
config are peft's, so a load goes through the method's peft conversion
(`PeftConvertibleConfig.from_peft_config`, every field honoured or refused) and a save writes the method's peft
export: LoRA and its peft variants (rsLoRA, DoRA, lora_bias), and LoKr (``<path>.lokr_w1`` ..., which diffusers
loads as peft's LoKr; a LoKr file without the metadata is refused rather than its factorization guessed).

A file holding several components is loaded one component at a time with
``load_diffusers_adapter(model, path, prefix="unet")``. A save writes only its one file, through a temporary
file renamed over it, never beside another format's adapter and never over a file deltatune did not write.
Deviation: diffusers' older key layouts (``.lora.down.weight``, ``processor.to_q_lora``) are refused by name
(convert them with diffusers first); extra trainable modules have no place in these files and are refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from deltatune.core.adapter_files import save_folder
from deltatune.core.attach import attach_adapter
from deltatune.core.capabilities import PeftConvertibleConfig
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
from deltatune.core.formats import AdapterFormat, AdapterLocation, other_markers, register_format
from deltatune.core.model import _config_of, iter_deltas
from deltatune.core.peft_format import peft_config_class, to_deltatune_keys
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError

FORMAT_NAME = "diffusers"
WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
PEFT_TYPES = ("LORA", "LOKR")  # the peft methods diffusers' load_lora_adapter builds
MARKERS = (".lora_A.", ".lora_B.", ".lokr_w1")  # a key holding one of these makes a file a diffusers adapter
# the key endings of peft's LoRA state dicts (linear/conv, lora_bias, DoRA's magnitude, embeddings) and LoKr's
PEFT_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector",
                      ".lora_embedding_A", ".lora_embedding_B")
PEFT_LOKR_SUFFIXES = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
PEFT_SUFFIXES = PEFT_LORA_SUFFIXES + PEFT_LOKR_SUFFIXES


def weights_file(location: AdapterLocation) -> Path | None:
    """The diffusers file a location names: the file itself, or a folder's pytorch_lora_weights.safetensors."""
    if location.file is not None:
        return location.file if location.file.suffix == ".safetensors" else None
    return location.folder / WEIGHTS if WEIGHTS in location.names else None


def is_diffusers_keys(keys: list[str]) -> bool:
    """Every key starts with a pipeline component (``unet.``) and some key is a peft LoRA tensor; or (a model's
    own save) no key has a component and every key is a peft LoRA tensor (peft's own files start with
    ``base_model.model.``, kohya's with ``lora_``, deltatune's end in ``lora_A`` without ``.weight``)."""
    if not keys:
        return False
    if all(key.partition(".")[0] in PREFIXES for key in keys):
        return any(marker in key for key in keys for marker in MARKERS)
    return all(_is_unprefixed_lora_key(key) for key in keys)


def _is_unprefixed_lora_key(key: str) -> bool:
    return key.endswith(PEFT_SUFFIXES) and not key.startswith(("base_model.", "lora_", "lycoris_")) and \
        key.partition(".")[0] not in PREFIXES


def detect_diffusers(location: AdapterLocation) -> bool:
    path = weights_file(location)
    found = header(path) if path is not None else None
    return found is not None and is_diffusers_keys(found[0])


# --- load -----------------------------------------------------------------------------------------------------
def load_diffusers_adapter(model: nn.Module, location: AdapterLocation | str | os.PathLike, name: str = "default",
                           *, trainable: bool = False, allow_nonfinite: bool = False, prefix: str | None = None
                           ) -> nn.Module:
    """Load a diffusers LoRA file onto `model` (the component `prefix` adapts: ``"unet"``, ...) as adapter
    `name`; the model is unchanged on any error."""
    if isinstance(location, AdapterLocation):
        path = weights_file(location)
    else:
        path = Path(location) / WEIGHTS if Path(location).is_dir() else Path(location)
    raw = read_safetensors(path)
    if not allow_nonfinite:
        refuse_nonfinite(raw, path)
    prefix = _component(raw, path, prefix)
    stripped = {_strip(key, prefix): tensor for key, tensor in raw.items() if _in_component(key, prefix)}
    peft = _peft_config(path, prefix, stripped)
    config_cls = peft_config_class(peft.get("peft_type", "LORA"))
    try:
        config = config_cls.from_peft_config(peft, list(stripped))
    except ConfigError as error:
        raise ConfigError(f"{path} ({METADATA_KEY} of {prefix or 'the file'!r}): {error}") from None
    config = exact_targets(model, config, list(config.targets))
    tensors = to_deltatune_keys(model, config, stripped, path)
    return attach_adapter(model, config, tensors, name, trainable, source=path)


def _in_component(key: str, prefix: str) -> bool:
    return not prefix or key.partition(".")[0] == prefix


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) + 1:] if prefix else key


def _component(raw: dict[str, Tensor], source: Path, prefix: str | None) -> str:
    """The component to load ("" for a file without components)."""
    if not any(key.partition(".")[0] in PREFIXES for key in raw):
        if prefix:
            raise AdapterFileError(f"{source} has no components (a model's own save); load it without prefix")
        return ""
    found = sorted({key.partition(".")[0] for key in raw})
    if prefix is None:
        if len(found) > 1:
            raise AdapterFileError(f"{source} adapts several components ({', '.join(found)}); load one with "
                                   "deltatune.core.diffusers_format.load_diffusers_adapter(model, path, "
                                   f"prefix={found[0]!r})")
        prefix = found[0]
    if prefix not in found:
        raise AdapterFileError(f"{source} has no {prefix!r} tensors; its components: {', '.join(found)}")
    old = [key for key in raw if key.startswith(f"{prefix}.") and not key.endswith(PEFT_SUFFIXES)]
    if old:
        raise AdapterFileError(f"{source}: key {old[0]!r} is not a peft LoRA key (lora_A / lora_B / ...): "
                               "diffusers' older layout or another method, which deltatune does not read; load it "
                               "with diffusers and save it again (save_lora_weights writes peft keys)")
    return prefix


def _peft_config(source: Path, prefix: str, stripped: dict[str, Tensor]) -> dict[str, Any]:
    """The peft config of component `prefix`: from the file's metadata, else diffusers' rule (alpha = rank)."""
    found = header(source)
    text = (found[1] if found else {}).get(METADATA_KEY)
    if text:
        try:
            packed = json.loads(text)
        except ValueError as error:
            raise AdapterFileError(f"{source}: metadata {METADATA_KEY} is not valid JSON ({error}); re-save the "
                                   "adapter") from None
        if not isinstance(packed, dict):
            raise AdapterFileError(f"{source}: metadata {METADATA_KEY} must be a JSON object; re-save the adapter")
        peft = {_strip(key, prefix): value for key, value in packed.items() if not prefix or
                key.startswith(f"{prefix}.")}
        if peft:
            return {"peft_type": "LORA", **peft}
    if any(key.endswith(PEFT_LOKR_SUFFIXES) for key in stripped):
        raise AdapterFileError(f"{source} holds LoKr tensors without {METADATA_KEY}, whose factorization deltatune "
                               "does not guess; save it with diffusers' save_lora_adapter (which writes the metadata)")
    ranks = {key: int(tensor.shape[1]) for key, tensor in stripped.items()
             if ".lora_B." in key and tensor.dim() > 1}
    rank = int(one_value(ranks, "the rank", source, "add lora_adapter_metadata with rank_pattern, or split the file"))
    return {"peft_type": "LORA", "r": rank, "lora_alpha": rank}


# --- save -----------------------------------------------------------------------------------------------------
def default_component(model: nn.Module) -> str:
    """The pipeline component a model is: ``text_encoder`` for transformers models, ``transformer`` for diffusers
    transformer models, else ``unet``."""
    module, name = type(model).__module__ or "", type(model).__name__
    if module.startswith("transformers."):
        return "text_encoder"
    return "transformer" if module.startswith("diffusers.") and "Transformer" in name else "unet"


def save_diffusers_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                           prefix: str | None = None) -> Path:
    """Write adapter `name` as ``pytorch_lora_weights.safetensors`` into folder `path`; `prefix` (the component,
    ``"unet"``) overrides `default_component`. Returns the folder, as diffusers' loaders take it."""
    config = _config_of(model, name)
    if not isinstance(config, PeftConvertibleConfig) or config.peft_type not in PEFT_TYPES:
        raise DeltatuneError(f"{type(config).__name__} has no diffusers LoRA form (diffusers loads peft "
                             f"{', '.join(PEFT_TYPES)} adapters); save with format='deltatune'")
    prefix = default_component(model) if prefix is None else prefix
    if prefix not in PREFIXES:
        raise DeltatuneError(f"prefix={prefix!r} is not a diffusers component; use one of {', '.join(PREFIXES)}")
    refuse_extras(model, config, FORMAT_NAME)
    folder = save_folder(path, (WEIGHTS,), other_markers(FORMAT_NAME))
    refuse_foreign_overwrite(folder / WEIGHTS, FORMAT_NAME)
    tensors: dict[str, Tensor] = {}
    targets = []
    for module_path, _, delta in iter_deltas(model, name):
        targets.append(module_path)
        for ours, theirs in delta.peft_tensor_names().items():
            tensors[f"{prefix}.{module_path}.{theirs}"] = getattr(delta, ours)
    peft = config.to_peft_config(targets, [])
    packed = {f"{prefix}.{key}": value for key, value in peft.items()}
    warn_statistics_left_out(model, FORMAT_NAME)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    write_weights(folder / WEIGHTS, tensors, metadata, FORMAT_NAME)
    return folder


DIFFUSERS_FORMAT = register_format(AdapterFormat(
    FORMAT_NAME, detect=detect_diffusers, load=load_diffusers_adapter, save=save_diffusers_adapter,
    marker=WEIGHTS, files=(WEIGHTS,),
))

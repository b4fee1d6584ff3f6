"""peft interop: read and write Hugging Face peft adapter folders (adapter_config.json + adapter_model.safetensors),
as the "peft" entry of the format table (`deltatune.core.formats`).

A method joins by giving its config class a `peft_type` ClassVar plus `to_peft_config(target_paths,
extra_paths)` / `from_peft_config(peft_config, tensor_keys)` (which honours or refuses every peft field), and its
delta a `peft_tensor_names()` map from its tensor names to peft's key suffixes. Keys in peft files are
``base_model.model.<module path>.<peft suffix>``; extra trainable modules (peft's ``modules_to_save``) are
``base_model.model.<module path>.<param>``. A load learns the deltatune names of those keys from blueprints of
the deltas (`deltatune.core.blueprint`), so the user's model is only read until the adapter is attached.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from deltatune.core.adapter_files import (
    CONFIG_DIGEST,
    canonical_digest,
    check_config_record,
    save_folder,
    write_weights_then_config,
)
from deltatune.core.attach import attach_adapter
from deltatune.core.blueprint import delta_blueprint, planned_layers, planned_state_keys
from deltatune.core.capabilities import PeftConvertibleConfig
from deltatune.core.config import DeltaConfig
from deltatune.core.files import pickle_refusal, read_json, read_safetensors, refuse_nonfinite
from deltatune.core.formats import AdapterFormat, AdapterLocation, folder_holds, other_markers, register_format
from deltatune.core.layers import LayerInfo
from deltatune.core.model import _config_of, extra_modules, iter_deltas
from deltatune.core.registry import list_methods
from deltatune.core.running_stats import running_statistics
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError

FORMAT_NAME = "peft"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_BASE_LAYER = "base_layer"  # peft's name for the wrapped layer inside its LoRA layer


def peft_config_class(peft_type: str):
    convertible = [e.config_cls for e in list_methods() if isinstance(e.config_cls, PeftConvertibleConfig)]
    for config_cls in convertible:
        if config_cls.peft_type == peft_type:
            return config_cls
    supported = sorted(str(config_cls.peft_type) for config_cls in convertible)
    raise AdapterFileError(f"peft_type {peft_type!r} cannot be imported; supported: {supported}")


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` as a peft folder that `PeftModel.from_pretrained` loads (only its two files, each
    atomically; see `deltatune.core.adapter_files`)."""
    config = _config_of(model, name)
    if not isinstance(config, PeftConvertibleConfig):
        raise DeltatuneError(f"{type(config).__name__} has no peft equivalent; save with format='deltatune'")
    folder = save_folder(path, (PEFT_CONFIG, PEFT_WEIGHTS), other_markers(FORMAT_NAME))
    tensors: dict[str, Tensor] = {}
    targets = []
    for path_, _, delta in iter_deltas(model, name):
        targets.append(path_)
        for ours, theirs in delta.peft_tensor_names().items():
            tensors[f"{PREFIX}{path_}.{theirs}"] = getattr(delta, ours).detach().contiguous()
    extras = extra_modules(model, config)
    for path_, module in extras:
        for key, tensor in module.state_dict().items():
            tensors[f"{PREFIX}{path_}.{key}"] = tensor.detach().contiguous()
    _warn_statistics_left_out(model, tensors)
    peft_config = config.to_peft_config(targets, [p for p, _ in extras])
    metadata = {"format": "pt", CONFIG_DIGEST: canonical_digest(peft_config)}
    write_weights_then_config(folder, PEFT_WEIGHTS, PEFT_CONFIG, tensors, metadata, peft_config)
    return folder


def _warn_statistics_left_out(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """peft files have no place for normalization statistics outside modules_to_save: say what is left out."""
    left_out = [key for key in running_statistics(model) if f"{PREFIX}{key}" not in tensors]
    if left_out:
        warnings.warn(
            f"format='peft' leaves out the running statistics of the model's normalization layers ({len(left_out)} "
            f"buffers, first {left_out[0]!r}): a reloaded adapter runs with the base model's statistics; "
            "save with format='deltatune' to keep them", UserWarning, stacklevel=3,
        )


def load_peft_adapter(
    model: nn.Module, location: AdapterLocation | Path, name: str = "default", *, trainable: bool = False,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a peft folder written by peft (or by `save_peft_adapter`) as deltatune adapter `name`."""
    folder = location.folder if isinstance(location, AdapterLocation) else Path(location)
    peft_config = read_json(folder / PEFT_CONFIG)
    if not isinstance(peft_config.get("peft_type"), str):
        raise AdapterFileError(f"{folder / PEFT_CONFIG} has no 'peft_type' string; it is not a peft adapter config")
    weights = folder / PEFT_WEIGHTS
    if not weights.exists() and (folder / "adapter_model.bin").exists():
        raise AdapterFileError(pickle_refusal(folder / "adapter_model.bin"))
    config_cls = peft_config_class(peft_config["peft_type"])
    raw = read_safetensors(weights)
    check_config_record(peft_config, weights, folder / PEFT_CONFIG)
    if not allow_nonfinite:
        refuse_nonfinite(raw, weights)
    stripped = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    try:
        config = config_cls.from_peft_config(peft_config, list(stripped))
    except ConfigError as error:
        raise ConfigError(f"{folder / PEFT_CONFIG}: {error}") from None
    tensors = to_deltatune_keys(model, config, stripped, weights)
    return attach_adapter(model, config, tensors, name, trainable, source=folder)


def peft_key_renames(config: DeltaConfig, path: str, layer: LayerInfo) -> dict[str, str]:
    """peft key -> deltatune key (both without peft's prefix) of the tensors `config`'s delta has on the layer
    at `path`: from the method's `peft_tensor_names`, on a blueprint of the delta (nothing is adapted)."""
    names = delta_blueprint(config, path, layer).peft_tensor_names()
    return {f"{path}.{theirs}": f"{path}.{ours}" for ours, theirs in names.items()}


def to_deltatune_keys(model: nn.Module, config: DeltaConfig, stripped: dict[str, Tensor], source: Path
                       ) -> dict[str, Tensor]:
    """Rename peft keys to ours, for the layers `config` targets on `model` (the model is only read)."""
    renames: dict[str, str] = {}
    for path, layer in planned_layers(model, config):
        renames |= peft_key_renames(config, path, layer)
    tensors = {renames.get(key, key): tensor for key, tensor in stripped.items()}
    return _drop_unchanged_base_copies(model, tensors, planned_state_keys(model, config), source)


def _drop_unchanged_base_copies(model: nn.Module, tensors: dict[str, Tensor], wanted: set[str], source: Path
                                ) -> dict[str, Tensor]:
    """peft saves the base weights of targeted embedding layers beside the adapter (`<module>.base_layer.weight`,
    for resized vocabularies). A copy equal to the model's own weight is dropped; a different one would have to
    replace the base weight, which a load never does, so it is refused by name."""
    base = model.state_dict()
    kept = {}
    for key, tensor in tensors.items():
        base_key = key.replace(f".{PEFT_BASE_LAYER}.", ".")
        if key in wanted or base_key not in base:
            kept[key] = tensor
        elif not _same_values(tensor, base[base_key]):
            raise AdapterFileError(
                f"{source} holds a base weight {key!r} that differs from this model's {base_key!r} (peft saves the "
                "base of targeted embedding layers, changed e.g. by resize_token_embeddings); load it onto the "
                "model it was trained from, or resize this model's embeddings the same way first"
            )
    return kept


def _same_values(saved: Tensor, own: Tensor) -> bool:
    if saved.shape != own.shape or saved.is_floating_point() != own.is_floating_point():
        return False
    if saved.is_floating_point():
        return torch.equal(saved.double(), own.detach().double().cpu())
    return torch.equal(saved, own.detach().cpu())


PEFT_FORMAT = register_format(AdapterFormat(
    FORMAT_NAME, detect=folder_holds(PEFT_CONFIG), load=load_peft_adapter, save=save_peft_adapter,
    marker=PEFT_CONFIG, files=(PEFT_CONFIG, PEFT_WEIGHTS),
))

"""deltatune: parameter-efficient fine-tuning, sparse and low-rank adaptation, and model merging for any
PyTorch model.

The shortest path::

    import deltatune
    from deltatune import LoRAConfig

    model = deltatune.adapt(model, LoRAConfig(rank=8, targets=["query", "value"]))
    # every method the same way: deltatune.adapt(model, deltatune.SaRAConfig()), AdaLoRAConfig(...), ...
    ...train...
    deltatune.save_adapter(model, "out/adapter")            # or format="peft"
    deltatune.load_adapter(fresh_model, "out/adapter")       # deltatune or peft folders
    plain = deltatune.unload(model, merge=True)              # plain nn.Modules, adapter folded in
    deltatune.save_merged(model, "out/merged")               # transformers: from_pretrained loads it, no deltatune

transformers' save_pretrained of an adapted model (and so every HF Trainer checkpoint) writes a file whose deltas a
plain from_pretrained drops: use save_adapter or save_merged, and for Trainer checkpoints
deltatune.integrations.transformers.SaveAdapterCallback.
"""
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.model import (
    ParameterCount,
    active_adapters,
    adapt,
    delete_adapter,
    disabled,
    iter_deltas,
    merge,
    regularization_loss,
    set_active,
    set_trainable,
    trainable_parameters,
    unload,
    unmerge,
)
from deltatune.core.merged import save_merged
from deltatune.core.registry import list_methods, method_entry, register_method
from deltatune.core.state import adapter_names, adapter_state_dict, load_adapter, save_adapter
from deltatune.errors import DeltatuneError
from deltatune.methods.adalora import AdaLoRAConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.colora import CoLoRAConfig
from deltatune.methods.id3 import ID3Config
from deltatune.methods.increlora import IncreLoRAConfig
from deltatune.methods.lora import LoRAConfig
from deltatune.methods.sara import SaRAConfig
from deltatune.methods.snella import SNELLAConfig
from deltatune.methods.spt import SPTConfig
from deltatune.methods.triadaptlora import TriAdaptLoRAConfig
from deltatune.merging.adapters import combine_adapters
from deltatune.version import package_version

__version__ = package_version()


def config_for(method: str, **hyperparameters) -> DeltaConfig:
    """Build a registered method's config by name: `config_for("lora", rank=4, targets=["query"])`."""
    return method_entry(method).config_cls(**hyperparameters)


__all__ = [
    "AdaLoRAConfig", "BitFitConfig", "CoLoRAConfig", "Delta", "DeltaConfig", "DeltaKind", "DeltatuneError",
    "ID3Config", "IncreLoRAConfig", "LoRAConfig", "ParameterCount", "SNELLAConfig", "SPTConfig", "SaRAConfig",
    "TriAdaptLoRAConfig", "active_adapters", "adapt", "adapter_names", "adapter_state_dict", "combine_adapters",
    "config_for", "delete_adapter", "disabled", "iter_deltas", "list_methods", "load_adapter", "merge",
    "method_entry", "register_method", "regularization_loss", "save_adapter", "save_merged", "set_active",
    "set_trainable", "trainable_parameters", "unload", "unmerge",
]

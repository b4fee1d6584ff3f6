"""deltatune: parameter-efficient fine-tuning, sparse and low-rank adaptation, and model merging for any
PyTorch model.

The shortest path::

    import deltatune
    from deltatune import LoRAConfig

    model = deltatune.adapt(model, LoRAConfig(rank=8, targets=["query", "value"]))
    # every method the same way: deltatune.adapt(model, deltatune.SaRAConfig()), AdaLoRAConfig(...), ...
    ...train...
    deltatune.save_adapter(model, "out/adapter")            # or format="peft" | "kohya" | "diffusers"
    deltatune.load_adapter(fresh_model, "out/adapter")       # deltatune or peft folders, kohya or diffusers files
    plain = deltatune.unload(model, merge=True)              # plain nn.Modules, adapter folded in
    deltatune.quantize_base(model, bits=4)                   # before adapt: a frozen NF4 (or int8) base, QLoRA-style
    deltatune.save_merged(model, "out/merged")               # transformers: from_pretrained loads it, no deltatune

transformers' save_pretrained of an adapted model (and so every HF Trainer checkpoint) writes a file whose deltas a
plain from_pretrained drops: use save_adapter or save_merged, and for Trainer checkpoints
deltatune.integrations.transformers.SaveAdapterCallback.

Every registered method's config class is reachable here by its name (`deltatune.LoRAConfig`, ...): they are
read from the method registry (`__getattr__`, `__dir__`), so a new method needs no line in this file.
"""
from deltatune.core.attach import adapter_state_dict
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.hotswap import hotswap_adapter, prepare_hotswap
from deltatune.core.merged import save_merged
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
    set_training_mode,
    trainable_parameters,
    unload,
    unmerge,
)
from deltatune.core.quantized import (
    BaseMemory,
    MergeBackReport,
    QuantizedLinear,
    base_memory,
    dequantize_base,
    merge_quantized,
    quantize_base,
)
from deltatune.core.registry import list_methods, method_entry, register_method
from deltatune.core.routing import route
from deltatune.core.state import adapter_names, load_adapter, save_adapter
from deltatune.errors import DeltatuneError
from deltatune.merging.adapters import combine_adapters
from deltatune.version import package_version

__version__ = package_version()


def config_for(method: str, **hyperparameters) -> DeltaConfig:
    """Build a registered method's config by name: `config_for("lora", rank=4, targets=["query"])`."""
    return method_entry(method).config_cls(**hyperparameters)


def _registered_configs() -> dict[str, type[DeltaConfig]]:
    """Config class name -> class, for every registered method (built-in or registered later)."""
    return {entry.config_cls.__name__: entry.config_cls for entry in list_methods()}


def __getattr__(name: str):
    # Only called for names this module does not define: a registered method's config class, or an error.
    configs = _registered_configs()
    if name in configs:
        return configs[name]
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_registered_configs()))


__all__ = sorted(_registered_configs()) + [
    "BaseMemory", "Delta", "DeltaConfig", "DeltaKind", "DeltatuneError", "MergeBackReport", "ParameterCount",
    "QuantizedLinear", "active_adapters", "adapt", "adapter_names", "adapter_state_dict", "base_memory",
    "combine_adapters", "config_for", "delete_adapter", "dequantize_base", "disabled", "hotswap_adapter",
    "iter_deltas", "list_methods", "load_adapter", "merge", "merge_quantized", "method_entry", "prepare_hotswap",
    "quantize_base", "register_method", "regularization_loss", "route", "save_adapter", "save_merged", "set_active",
    "set_trainable", "set_training_mode", "trainable_parameters", "unload", "unmerge",
]

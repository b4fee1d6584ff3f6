"""Method registry: name -> (config class, delta class, one-line description). One decorator registers a method."""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta
from deltatune.errors import ConfigError


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type[DeltaConfig]
    delta_cls: type[Delta]
    description: str


_METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type[DeltaConfig], description: str = ""):
    """Class decorator for a Delta: `@register_method("lora", LoRAConfig, "one line")`."""

    def decorate(delta_cls: type[Delta]) -> type[Delta]:
        if name in _METHODS and _METHODS[name].delta_cls is not delta_cls:
            raise ConfigError(f"method {name!r} is registered twice; give the new method another name")
        config_cls.method = name
        summary = description or (delta_cls.__doc__ or "").strip().splitlines()[0]
        _METHODS[name] = MethodEntry(name, config_cls, delta_cls, summary)
        return delta_cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove a registered method (test-only toy deltas register for one test and leave no trace)."""
    _METHODS.pop(name, None)


_builtins_imported = False


def _import_builtin_methods() -> None:
    """Import every module of deltatune.methods once (each registers its method); later calls cost nothing, which
    matters since `deltatune.<Name>` lookups of config classes go through the registry."""
    global _builtins_imported
    if _builtins_imported:
        return
    import deltatune.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _builtins_imported = True


def method_entry(name: str) -> MethodEntry:
    _import_builtin_methods()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}.{hint}")
    return _METHODS[name]


def entry_for_config(config: DeltaConfig) -> MethodEntry:
    _import_builtin_methods()
    for entry in _METHODS.values():
        if type(config) is entry.config_cls:
            return entry
    raise ConfigError(
        f"{type(config).__name__} is not a registered method config; register its delta with @register_method"
    )


def list_methods() -> list[MethodEntry]:
    """Every registered method, sorted by name."""
    _import_builtin_methods()
    return [_METHODS[name] for name in sorted(_METHODS)]

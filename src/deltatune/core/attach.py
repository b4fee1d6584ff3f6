"""An adapter's tensors out of a model and into it: the state dicts a save writes, and attach-and-fill for a load.

Keys are the model's module paths plus the delta's tensor names (``encoder.layer.0.attention.self.query.lora_A``),
without the adapter's name, so that a file loads under any name. File formats (`deltatune.core.formats`) rename
their own keys to these before `attach_adapter`; nothing here reads or writes a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.core.files import check_saved_tensors
from deltatune.core.model import _config_of, adapt, delete_adapter, extra_modules, iter_deltas, set_trainable
from deltatune.core.running_stats import running_statistics
from deltatune.errors import AdapterFileError


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Every tensor that defines adapter `name`: its deltas' parameters and persistent buffers, and the
    parameters of its extra trainable modules. Keys are independent of the adapter name."""
    config = _config_of(model, name)
    state: dict[str, Tensor] = {}
    for path, _, delta in iter_deltas(model, name):
        for key, tensor in delta.state_dict().items():
            state[f"{path}.{key}"] = tensor
    for path, module in extra_modules(model, config):
        for key, tensor in module.state_dict().items():
            state[f"{path}.{key}" if path else key] = tensor
    return state


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a training checkpoint must keep: every trainable parameter and every delta tensor, under the
    model's own state-dict keys (base keys unchanged by adaptation)."""
    state = model.state_dict(keep_vars=True)
    statistics = running_statistics(model)  # changed by train-mode forwards: needed to resume exactly
    return {
        key: tensor.detach()
        for key, tensor in state.items()
        if ".deltas." in f".{key}" or (isinstance(tensor, nn.Parameter) and tensor.requires_grad) or key in statistics
    }


def load_trainable_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise AdapterFileError(
            f"checkpoint has tensors the model lacks, first {result.unexpected_keys[0]!r}; "
            "was it written for another model or adapter configuration?"
        )


def attach_adapter(
    model: nn.Module, config: Any, tensors: dict[str, Tensor], name: str, trainable: bool, source: Path
) -> nn.Module:
    """Inject `config` as adapter `name` and fill it with `tensors`, or roll back and raise."""
    adapt(model, config, name, trainable=trainable)
    try:
        _fill_adapter(model, name, tensors, source)
    except BaseException:
        delete_adapter(model, name)
        raise
    if not trainable:
        for _, _, delta in iter_deltas(model, name):
            delta.requires_grad_(False)
    else:
        set_trainable(model, name)
    return model


def _fill_adapter(model: nn.Module, name: str, tensors: dict[str, Tensor], source: Path) -> None:
    expected = adapter_state_dict(model, name)
    statistics = _saved_statistics(model, tensors, expected, source)
    tensors = {k: v for k, v in tensors.items() if k not in statistics}
    check_saved_tensors(expected, tensors, source=source, error=AdapterFileError,
                        missing_fix="was it saved for another model or config?",
                        shape_fix="the adapter was saved for a different model or rank")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterFileError(f"{source} has tensor {unexpected[0]!r} that matches nothing in the model; "
                               "was it saved for another model?")
    for key, target in expected.items():
        _check_dtype_kind(tensors[key], target, key, source)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
        for target, saved in statistics.values():
            target.copy_(saved)


def _saved_statistics(
    model: nn.Module, tensors: dict[str, Tensor], expected: dict[str, Tensor], source: Path
) -> dict[str, tuple[Tensor, Tensor]]:
    """The file's normalization statistics, key -> (model buffer, saved tensor): all of the model's or none."""
    buffers = {k: v for k, v in running_statistics(model).items() if k not in expected}
    present = [key for key in buffers if key in tensors]
    if not present:
        return {}
    missing = [key for key in buffers if key not in tensors]
    if missing:
        raise AdapterFileError(
            f"{source} has running statistics for {len(present)} of this model's normalization buffers but not "
            f"{missing[0]!r}; was it saved for another model?"
        )
    for key in present:
        if tuple(tensors[key].shape) != tuple(buffers[key].shape):
            raise AdapterFileError(
                f"{source}: statistics {key!r} have shape {tuple(tensors[key].shape)} but the model expects "
                f"{tuple(buffers[key].shape)}; the adapter was saved for a different model"
            )
    return {key: (buffers[key], tensors[key]) for key in present}


def _dtype_kind(tensor: Tensor) -> str:
    return "complex" if tensor.is_complex() else "float" if tensor.is_floating_point() else str(tensor.dtype)


def _check_dtype_kind(tensor: Tensor, target: Tensor, key: str, source: Path) -> None:
    """Floats load into floats of any precision (deltas follow the base dtype); integer and boolean tensors
    (positions, masks) must keep their exact dtype, since a cast would change what they index."""
    if _dtype_kind(tensor) != _dtype_kind(target):
        raise AdapterFileError(f"{source}: tensor {key!r} has dtype {tensor.dtype} but the model expects "
                               f"{target.dtype}; the file is corrupt or was written for another method")

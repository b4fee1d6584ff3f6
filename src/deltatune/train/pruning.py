"""Unstructured L1 magnitude pruning of a dense model's weights, and masks kept through retraining.

As the three-regime pruning code (`YefanZhou/ThreeRegimePruning`, `layer_adaptive_sparsity/pruners.py`, called
from `training_epochs/prune.py`): the weights of every `nn.Conv2d` (the code's default target; `layer_types`
adds `nn.Linear` or others) are pruned by |w|, either

- `scope="uniform"` (the code's default `unif`): each layer keeps the same fraction `density` of its own weights;
- `scope="global"` (`glob`): one cut-off over all the targeted weights together.

The selection is the delta algebra's `magnitude_keep_mask` (`merging.algebra.ops`) with `tie_break="index"`, so
exactly `keep_count(n, density)` = ⌊density·n⌋ (at least 1) entries survive; torch's `l1_unstructured`, which the
code uses, keeps n − round((1 − density)·n), at most one entry more per layer. Biases are not pruned (the code
prunes `weight` only).

Retraining keeps the masks (the code's `torch.nn.utils.prune` re-parameterisation w = w_orig ⊙ m has the same
effect): `PrunedWeights.attach()` zeroes the pruned entries and masks their gradient on every backward pass (also
SAM's second one, so its perturbation does not move them either), so plain SGD / momentum / weight decay / Adam
leave them at exactly 0; `apply()` re-zeroes them (call it after each step when an optimizer could still move
them, e.g. decoupled weight decay on a non-zero entry: it cannot here), and `check()` refuses a model whose pruned
entries are no longer zero. It is also a Trainer callback (`on_step_end` = `apply`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError, TrainingError
from deltatune.merging.algebra.ops import keep_count, magnitude_keep_mask

SCOPES = ("uniform", "global")
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d,)


def prunable_layers(model: nn.Module, layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES
                    ) -> dict[str, nn.Module]:
    """Module path -> module for every module of `layer_types` with a floating-point `weight`."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, tuple(layer_types)) and isinstance(getattr(module, "weight", None), Tensor)
              and module.weight.is_floating_point()}
    if not layers:
        kinds = ", ".join(kind.__name__ for kind in layer_types)
        raise ConfigError(f"the model has no {kinds} layer to prune; pass layer_types=(nn.Conv2d, nn.Linear) or the "
                          "layer types it has")
    return layers


def magnitude_masks(model: nn.Module, density: float, *, scope: str = "uniform",
                    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES) -> dict[str, Tensor]:
    """Module path -> boolean keep-mask of its weight: the `density` fraction with the largest |w|, per layer
    (`uniform`) or over all targeted layers (`global`). The model is not modified."""
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density={density!r} is invalid: expected the fraction of weights kept, 0 < density <= 1")
    if scope not in SCOPES:
        raise ConfigError(f"scope={scope!r} is invalid: expected one of {SCOPES} (the code's `unif` / `glob`)")
    weights = {name: layer.weight.detach() for name, layer in prunable_layers(model, layer_types).items()}
    if scope == "uniform":
        return {name: magnitude_keep_mask(weight, density, tie_break="index") for name, weight in weights.items()}
    flat = torch.cat([weight.reshape(-1) for weight in weights.values()])
    keep = magnitude_keep_mask(flat, density, tie_break="index")
    masks, start = {}, 0
    for name, weight in weights.items():
        masks[name] = keep[start:start + weight.numel()].reshape(weight.shape)
        start += weight.numel()
    return masks


def expected_kept(model: nn.Module, density: float, *, scope: str = "uniform",
                  layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES) -> int:
    """How many weights `magnitude_masks` keeps: Σ ⌊density·n_layer⌋ (uniform) or ⌊density·Σ n_layer⌋ (global)."""
    sizes = [layer.weight.numel() for layer in prunable_layers(model, layer_types).values()]
    return sum(keep_count(n, density) for n in sizes) if scope == "uniform" else keep_count(sum(sizes), density)


class PrunedWeights:
    """Masks on a model's weights, kept through retraining (see the module docstring).

        pruned = PrunedWeights(model, magnitude_masks(model, 0.2)).attach()
        ... train ...                      # pruned entries get zero gradient, stay 0
        pruned.check(); pruned.density()   # 0.2 (of the targeted weights)
        pruned.detach()
    """

    def __init__(self, model: nn.Module, masks: dict[str, Tensor]) -> None:
        modules = dict(model.named_modules())
        for name, mask in masks.items():
            weight = getattr(modules.get(name), "weight", None)
            if not isinstance(weight, Tensor):
                raise ConfigError(f"mask for {name!r}, which is not a module with a weight in this model; build the "
                                  "masks from the same model (magnitude_masks(model, density))")
            if mask.shape != weight.shape or mask.dtype != torch.bool:
                raise ConfigError(f"mask for {name!r} is {mask.dtype} {tuple(mask.shape)}; expected torch.bool of "
                                  f"the weight's shape {tuple(weight.shape)}")
        self.model = model
        self.masks = {name: mask.to(modules[name].weight.device) for name, mask in masks.items()}
        self._hooks: list[Any] = []

    def _weights(self) -> dict[str, Tensor]:
        modules = dict(self.model.named_modules())
        return {name: modules[name].weight for name in self.masks}

    def attach(self) -> PrunedWeights:
        """Zero the pruned weights and mask their gradients from now on (idempotent)."""
        self.apply()
        if not self._hooks:
            for name, weight in self._weights().items():
                keep = self.masks[name].to(weight.dtype)
                self._hooks.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
        return self

    def detach(self) -> None:
        """Stop masking gradients (the weights keep their zeros)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @torch.no_grad()
    def apply(self) -> None:
        """Set every pruned entry to 0."""
        for name, weight in self._weights().items():
            weight.masked_fill_(~self.masks[name], 0.0)

    def on_step_end(self, **_: Any) -> None:
        self.apply()

    def check(self) -> None:
        """Refuse a model whose pruned entries are no longer 0 (a training loop that bypassed the masks)."""
        moved = [name for name, weight in self._weights().items() if torch.any(weight.detach()[~self.masks[name]] != 0)]
        if moved:
            raise TrainingError(f"pruned weights of {moved} are no longer zero: the retraining moved them; attach() "
                                "the masks before building the optimizer's steps, or call apply() after each step")

    def density(self) -> float:
        """The fraction of the masked weights that are non-zero."""
        weights = self._weights().values()
        nonzero = sum(int(torch.count_nonzero(weight.detach())) for weight in weights)
        return nonzero / sum(weight.numel() for weight in weights)

    def kept(self) -> int:
        """How many entries the masks keep."""
        return sum(int(mask.sum()) for mask in self.masks.values())

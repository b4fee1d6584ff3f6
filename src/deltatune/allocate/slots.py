"""Low-rank deltas with a fixed number of rank slots: the shared body of AdaLoRA, IncreLoRA, TriAdaptLoRA and
CoLoRA (each method file fills in how slots mix, scale, start and change).

    ΔW = scale · B · M · A,   A: (capacity, fan_in) "down",  B: (out, capacity) "up",  M: slot mixer

M is a vector (a diagonal: AdaLoRA's singular values λ, or the live mask) or a capacity×capacity matrix
(TriAdaptLoRA's triangular core). Forward runs on the activation path, `up(mix(down(dropout(x))))`, in every
layer kind's native form (a matmul, a convolution then a 1×1 convolution, or an embedding lookup); ΔW is
never formed in forward. `rank_mask` (persistent, bool) marks live slots; shapes never change.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.core.capabilities import HasDropout
from deltatune.core.config import DeltaConfig
from deltatune.core.delta import Delta, DeltaKind
from deltatune.core.layers import ALL_KINDS, CONV, EMBEDDING, LayerInfo
from deltatune.errors import UnsupportedLayerError, config_check

Observer = Callable[[nn.Module, Tensor, Tensor], None]


class SlottedLowRankDelta(Delta):
    """Base class: `lora_A` (capacity, fan_in[, kernel]), `lora_B` (out, capacity[, 1...]), `rank_mask`."""

    kind = DeltaKind.ADDITIVE
    layer_kinds = ALL_KINDS

    def __init__(self, config: DeltaConfig, layer: LayerInfo, module_name: str, capacity: int, live: int) -> None:
        super().__init__(config, layer, module_name)
        check_slot_layer(layer, module_name, capacity)
        if layer.kind == CONV:
            self.lora_A = nn.Parameter(torch.zeros(capacity, *layer.weight_shape[1:]))
            self.lora_B = nn.Parameter(torch.zeros(layer.out_features, capacity, *([1] * layer.conv_dims)))
        else:
            self.lora_A = nn.Parameter(torch.zeros(capacity, layer.in_features))
            self.lora_B = nn.Parameter(torch.zeros(layer.out_features, capacity))
        mask = torch.zeros(capacity, dtype=torch.bool)
        mask[:live] = True
        self.register_buffer("rank_mask", mask)
        has_dropout = isinstance(config, HasDropout) and config.dropout > 0
        self.dropout = nn.Dropout(config.dropout) if has_dropout else nn.Identity()
        self._observer: Observer | None = None
        self._new_slots: dict[str, set[int]] = {}
        self.regularization_share = 1.0  # allocators set 1/(number of tensors) for the official "mean" form

    # --- what a method fills in ------------------------------------------------------------------------------
    def slot_mixer(self) -> Tensor:
        """(capacity,) diagonal or (capacity, capacity) matrix M."""
        raise NotImplementedError

    def scale(self) -> Tensor:
        raise NotImplementedError

    # --- capabilities used by allocators ---------------------------------------------------------------------
    @property
    def rank_capacity(self) -> int:
        return self.rank_mask.numel()

    @property
    def rank(self) -> int:
        return int(self.rank_mask.sum())

    def component_tensors(self) -> dict[str, tuple[Tensor, int]]:
        return {"lora_A": (self.lora_A, 0), "lora_B": (self.lora_B, 1)}

    def live_parameter_count(self) -> int:
        return self.rank * (self.layer.fan_in + self.layer.out_features)

    def set_activation_observer(self, observer: Observer | None) -> None:
        self._observer = observer

    def used_slot_mask(self) -> Tensor:
        """Slots that can contribute to ΔW (methods with other contributing slots override this)."""
        return self.rank_mask

    def used_slots(self) -> int:
        """k such that slots >= k are all unused: forward and ΔW compute slots [0, k) only, so reserved
        capacity costs nothing until it is used (slots fill from the front)."""
        used = torch.nonzero(self.used_slot_mask())
        return max(int(used.max()) + 1, 1) if used.numel() else 1

    # --- the math ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        x_in = x if self.layer.kind == EMBEDDING else self.dropout(x.to(self.lora_A.dtype))
        k = self.used_slots()
        down, up, mixer = self._slots(k)
        hidden = _DOWN[self.layer.kind](self.layer, down, x_in)
        hidden = _mix(hidden, mixer, channel_dim=1 if self.layer.kind == CONV else -1)
        out = _UP[self.layer.kind](self.layer, up, hidden) * self.scale()
        if self._observer is not None:
            self._observer(self, x_in, out)
        return out.to(x.dtype if x.is_floating_point() else self.lora_A.dtype)

    def _slots(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """A, B and M restricted to the first k slots."""
        mixer = self.slot_mixer()
        mixer = mixer[:k] if mixer.dim() == 1 else mixer[:k, :k]
        return self.lora_A[:k], self.lora_B[:, :k], mixer

    def delta_matrix(self) -> Tensor:
        k = self.used_slots()
        down, up, mixer = self._slots(k)
        down, up = down.reshape(k, -1), up.reshape(self.layer.out_features, k)
        mixed_up = up * mixer if mixer.dim() == 1 else up @ mixer
        return (mixed_up @ down) * self.scale()

    def delta_weight(self, base_weight: Tensor) -> Tensor:
        return self.layer.from_matrix(self.delta_matrix()).to(base_weight.dtype)

    # --- helpers for method files -----------------------------------------------------------------------------
    def slot_generator(self, seed: int, step: int) -> torch.Generator:
        """A generator fixed by (seed, module path, step): growth is reproducible and resumable."""
        key = zlib.crc32(f"{self.module_name}|{step}".encode())
        return torch.Generator().manual_seed((seed * 1_000_003 + key) % (2**63))

    def write_slots(self, parameter: Tensor, slot_dim: int, slots: Tensor, values: Tensor) -> None:
        """Copy `values` (slots along dim 0) into `parameter` at `slots` along `slot_dim`, in place. The slots
        count as new (`take_new_slots`): a slot written here starts over with fresh optimizer state."""
        with torch.no_grad():
            view = parameter.movedim(slot_dim, 0)
            view[slots] = values.to(device=parameter.device, dtype=parameter.dtype).reshape(view[slots].shape)
        self.mark_new_slots(parameter, slots)

    def mark_new_slots(self, parameter: Tensor, slots: Tensor) -> None:
        """Record `slots` of component tensor `parameter` as starting over (values kept, state fresh)."""
        name = next(n for n, (tensor, _) in self.component_tensors().items() if tensor is parameter)
        self._new_slots.setdefault(name, set()).update(int(i) for i in slots.reshape(-1).tolist())

    def take_new_slots(self) -> dict[str, Tensor]:
        """`HasNewSlots`: the slots written by `write_slots` / `mark_new_slots` since the last call."""
        taken = {name: torch.tensor(sorted(slots), dtype=torch.int64) for name, slots in self._new_slots.items()}
        self._new_slots = {}
        return taken

    def slot_shape(self, parameter: Tensor, slot_dim: int, count: int) -> tuple[int, ...]:
        shape = list(parameter.movedim(slot_dim, 0).shape)
        shape[0] = count
        return tuple(shape)


def _dense_down(layer: LayerInfo, down: Tensor, x: Tensor) -> Tensor:
    return F.linear(x, down)


def _dense_up(layer: LayerInfo, up: Tensor, hidden: Tensor) -> Tensor:
    return F.linear(hidden, up)


def _conv(layer: LayerInfo) -> Callable[..., Tensor]:
    return (F.conv1d, F.conv2d, F.conv3d)[layer.conv_dims - 1]


def _conv_down(layer: LayerInfo, down: Tensor, x: Tensor) -> Tensor:
    return _conv(layer)(x, down, **layer.conv_args)


def _conv_up(layer: LayerInfo, up: Tensor, hidden: Tensor) -> Tensor:
    return _conv(layer)(hidden, up)


def _embedding_down(layer: LayerInfo, down: Tensor, x: Tensor) -> Tensor:
    return F.embedding(x, down.T, **layer.embedding_args)


_DOWN = {"linear": _dense_down, "conv1d_hf": _dense_down, CONV: _conv_down, EMBEDDING: _embedding_down}
_UP = {"linear": _dense_up, "conv1d_hf": _dense_up, CONV: _conv_up, EMBEDDING: _dense_up}


def _mix(hidden: Tensor, mixer: Tensor, channel_dim: int) -> Tensor:
    """Apply M to the slot channels: a per-channel product for a diagonal, a channel matmul for a matrix."""
    if mixer.dim() == 1:
        shape = [1] * hidden.dim()
        shape[channel_dim] = -1
        return hidden * mixer.reshape(shape)
    if channel_dim == -1:
        return F.linear(hidden, mixer)
    return torch.einsum("ij,nj...->ni...", mixer, hidden)


def check_slot_layer(layer: LayerInfo, module_name: str, capacity: int) -> None:
    if layer.kind == CONV and layer.conv_args.get("groups", 1) != 1:
        raise UnsupportedLayerError(
            f"rank-slot methods cannot adapt grouped convolution {module_name!r} "
            f"(groups={layer.conv_args['groups']}); exclude it from `targets`"
        )
    # no upper bound: like peft's AdaLoRA, a rank above min(in, out) is redundant but valid
    config_check(capacity >= 1, "rank capacity", capacity, "an integer >= 1")


def orthogonality_penalty(down: Tensor, up: Tensor, mask: Tensor | None = None, squared: bool = True) -> Tensor:
    """‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F over the live slots (AdaLoRA Eq. 4 when `squared`: both norms squared;
    the official codes use the plain norms). A is (capacity, fan_in...) and B (out, capacity...)."""
    capacity = down.shape[0]
    rows = down.reshape(capacity, -1)
    columns = up.reshape(up.shape[0], capacity)
    if mask is None:
        eye = torch.eye(capacity, dtype=rows.dtype, device=rows.device)
    else:
        live = mask.to(rows.dtype)
        rows, columns, eye = rows * live[:, None], columns * live, torch.diag(live)
    gram_down = torch.linalg.matrix_norm(rows @ rows.T - eye)
    gram_up = torch.linalg.matrix_norm(columns.T @ columns - eye)
    return gram_down**2 + gram_up**2 if squared else gram_down + gram_up


def kaiming_rows(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """LoRA's Kaiming-uniform (a=√5) init for rows of A, drawn from `generator` (fan_in = row length)."""
    fan_in = math.prod(shape[1:])
    bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def gaussian(shape: tuple[int, ...], generator: torch.Generator | None, std: float) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


"""Fresh optimizer state for rank slots that an allocator (re)initializes during training.

Slots live in tensors that exist from the start, so a slot that grows at step t would otherwise inherit its
tensor's Adam moments and step count: its first updates come out several times a new parameter's (the bias
correction of a tensor at step S ≫ 1 is ~1 where a new parameter's is 1 − β^k). The official IncreLoRA code
makes every new component its own parameter in a new optimizer parameter group, i.e. fresh state; this gives
a slot the same, without changing shapes:

- when the allocator (re)initializes slots (`protocols.HasNewSlots`), their entries of every moment
  tensor of the optimizer (Adam's m, v and AMSGrad's max v; SGD's momentum buffer) are zeroed, and each slot
  starts its own step count k;
- an optimizer step hook (`register_step_pre_hook` / `_post_hook`) keeps each young slot's values and the
  hyper-parameters of the step (its lr, read as the optimizer uses it), and afterwards rewrites the slot with
  the update a new parameter gets at its k-th step:

      θ ← θ₋ · (1 − lr·λ)  [AdamW]  −  lr / (1 − β₁^k) · m / (√v / √(1 − β₂^k) + ε)

  Adam's m and v do not depend on the step count, so after the reset they are exactly a new parameter's.
  A slot stops being young once both bias corrections equal its tensor's in float64.

Supported: `torch.optim.Adam` and `AdamW` (any options: weight decay, AMSGrad, maximize) and `SGD` (momentum
with dampening 0; its state has no step count, so zeroing the buffer is enough). Other optimizers (AdamR, whose
decay step uses the mean second moment over all parameters, RMSprop, ...) are refused when attached; set
`allocator.fresh_optimizer_state = False` to let new slots share their tensor's state instead.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltatune.allocate.allocator import AllocationError, Allocator
from deltatune.allocate.protocols import HasNewSlots

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SGD_MOMENTS = ("momentum_buffer",)


class FreshSlotAllocator(Allocator):
    """Base of the allocators that (re)initialize slots: those slots get a new parameter's optimizer state.

    `attach_optimizer(optimizer)` (the Trainer callback calls it at `on_train_begin`; `step(...,
    optimizer=)` does too) hooks the optimizer; subclasses change slots through `reinitialize`."""

    def __init__(self, model: nn.Module, total_steps: int, adapter: str = "default") -> None:
        super().__init__(model, total_steps, adapter)
        self.fresh_optimizer_state = True
        self.fresh = FreshSlotState(self.deltas)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self.fresh_optimizer_state:
            self.fresh.attach(optimizer)

    def _before_step(self) -> None:
        if self.fresh_optimizer_state:
            self.fresh.check_no_step_missed()

    def reinitialize(self, path: str, change: Callable[[], Any]) -> Any:
        """Run `change()` (a grow or resize of delta `path`); the slots it wrote start with fresh state."""
        delta = self.deltas[path]
        reporting = isinstance(delta, HasNewSlots)
        if reporting:
            delta.take_new_slots()  # forget writes made outside an allocation (construction, loading)
        result = change()
        if reporting and self.fresh_optimizer_state:
            self.fresh.restart(path, delta.take_new_slots())
        return result

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "fresh_state": self.fresh.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fresh.load_state_dict(state.get("fresh_state", {"ages": {}, "seen": {}}))


def optimizer_rule(optimizer: torch.optim.Optimizer) -> str:
    """"adam" or "sgd": how new slots get fresh state in this optimizer; refuses the others by name."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        damped = [g["dampening"] for g in optimizer.param_groups if g["momentum"] != 0 and g["dampening"] != 0]
        if damped:
            raise AllocationError(
                f"SGD with momentum and dampening={damped[0]} cannot give new rank components fresh state (its "
                "first step keeps the whole gradient); use dampening=0, Adam or AdamW, or set "
                "allocator.fresh_optimizer_state = False to let them share their tensor's state")
        return "sgd"
    raise AllocationError(
        f"{type(optimizer).__name__} cannot give new rank components fresh optimizer state (deltatune does this "
        "for torch.optim.Adam, AdamW and SGD); train with one of those, or set "
        "allocator.fresh_optimizer_state = False to let new components share their tensor's state")


class FreshSlotState:
    """Per component tensor of the allocator's deltas ("path|name"): each slot's own optimizer step count."""

    def __init__(self, deltas: dict[str, nn.Module]) -> None:
        self.deltas = deltas
        self.optimizer: torch.optim.Optimizer | None = None
        self.rule = ""
        self.ages: dict[str, Tensor] = {}  # (capacity,) int64: steps taken since the reset; -1 = tensor's state
        self.seen: dict[str, int] = {}  # the tensor's optimizer step count when this last saw it
        self._handles: list[Any] = []
        self._pending: dict[str, tuple[Tensor, Tensor, dict[str, Any], int]] = {}
        self._warned = False

    # --- wiring -----------------------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook into `optimizer` (idempotent); call before its first step, after a resume too."""
        optimizer = _unwrapped(optimizer)
        if optimizer is self.optimizer:
            return
        rule = optimizer_rule(optimizer)
        self.detach()
        self.optimizer, self.rule = optimizer, rule
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.optimizer, self._pending = [], None, {}

    def _tensor(self, key: str) -> tuple[Tensor, int]:
        path, name = key.split("|")
        return self.deltas[path].component_tensors()[name]

    def _step_count(self, parameter: Tensor) -> int:
        state = self.optimizer.state.get(parameter, {})
        step = state.get("step", 0)
        return int(step.item() if isinstance(step, Tensor) else step)

    # --- new slots ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def restart(self, path: str, new_slots: dict[str, Tensor]) -> None:
        """Give `new_slots` (component tensor name -> slot indices) a new parameter's optimizer state."""
        new_slots = {name: slots for name, slots in new_slots.items() if slots.numel()}
        if not new_slots:
            return
        if self.optimizer is None:
            self._warn_unattached()
            return
        for name, slots in new_slots.items():
            key = f"{path}|{name}"
            parameter, slot_dim = self._tensor(key)
            state = self.optimizer.state.get(parameter, {})
            for moment in ADAM_MOMENTS if self.rule == "adam" else SGD_MOMENTS:
                if isinstance(state.get(moment), Tensor):
                    state[moment].movedim(slot_dim, 0)[slots.to(state[moment].device)] = 0
            if self.rule == "adam":
                ages = self.ages.setdefault(key, torch.full((parameter.shape[slot_dim],), -1, dtype=torch.int64))
                ages[slots.cpu()] = 0
                self.seen[key] = self._step_count(parameter)

    def _warn_unattached(self) -> None:
        if not self._warned:
            warnings.warn("rank components were added but no optimizer is attached to the allocator, so they "
                          "share their tensor's optimizer state (moments and step count); call "
                          "allocator.attach_optimizer(optimizer) before training (the Trainer callback does)",
                          stacklevel=4)
            self._warned = True

    def check_no_step_missed(self) -> None:
        """Every optimizer step since the last check went through the hooks (else a young slot got the
        tensor's bias correction): refuse to go on silently."""
        young = [key for key, ages in self.ages.items() if bool((ages >= 0).any())]
        if not young:
            return
        if self.optimizer is None:
            raise AllocationError(
                f"{young[0]} has new rank components whose optimizer state the allocator keeps, but no optimizer "
                "is attached: call allocator.attach_optimizer(optimizer) before the first optimizer.step (after "
                "loading a checkpoint too)")
        for key in young:
            if self._step_count(self._tensor(key)[0]) != self.seen[key]:
                raise AllocationError(
                    f"an optimizer step of {key} ran without the allocator's hooks (another optimizer, or one "
                    "attached too late): call allocator.attach_optimizer(optimizer) with the optimizer that "
                    "trains the model, before its first step")

    # --- the hooks ------------------------------------------------------------------------------------------
    def _full_tensors(self, optimizer: torch.optim.Optimizer) -> Any:
        """The deltas' full tensors and optimizer state while a hook reads and rewrites slots (a sharded model:
        every process runs the same hook, a collective; a no-op otherwise)."""
        from deltatune.train.sharding import full_parameters  # train imports allocate: import when used

        return full_parameters(nn.ModuleList(self.deltas.values()), optimizer)

    def _before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._pending = {}
        if any(bool((ages >= 0).any()) for ages in self.ages.values()):
            with self._full_tensors(optimizer):
                self._record_young_slots(optimizer)

    @torch.no_grad()
    def _record_young_slots(self, optimizer: torch.optim.Optimizer) -> None:
        for key, ages in self.ages.items():
            slots = torch.nonzero(ages >= 0).reshape(-1)
            if slots.numel() == 0:
                continue
            parameter, slot_dim = self._tensor(key)
            group = _group_of(optimizer, parameter)
            if group is None:
                continue
            settings = {name: _number(group[name]) for name in ("lr", "eps", "weight_decay")}
            settings.update(betas=tuple(_number(b) for b in group["betas"]), amsgrad=bool(group.get("amsgrad")),
                            decoupled=bool(group.get("decoupled_weight_decay"))
                            or isinstance(optimizer, torch.optim.AdamW))
            values = parameter.detach().movedim(slot_dim, 0)[slots.to(parameter.device)].clone()
            self._pending[key] = (slots, values, settings, self._step_count(parameter))

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        pending, self._pending = self._pending, {}
        if pending:
            with self._full_tensors(optimizer):
                self._correct_young_slots(optimizer, pending)

    @torch.no_grad()
    def _correct_young_slots(self, optimizer: torch.optim.Optimizer,
                             pending: dict[str, tuple[Tensor, Tensor, dict[str, Any], int]]) -> None:
        for key, (slots, before, settings, step_before) in pending.items():
            parameter, slot_dim = self._tensor(key)
            step = self._step_count(parameter)
            if step == step_before:  # no gradient: the optimizer left this tensor alone
                continue
            ages = self.ages[key]
            ages[slots] += 1
            state = optimizer.state[parameter]
            corrected = _new_parameter_update(before, ages[slots], state, slots.to(parameter.device), slot_dim,
                                              settings)
            parameter.movedim(slot_dim, 0)[slots.to(parameter.device)] = corrected.to(parameter.dtype)
            self.seen[key] = step
            ages[slots[_caught_up(ages[slots], step, settings["betas"])]] = -1

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        young = {key: ages for key, ages in self.ages.items() if bool((ages >= 0).any())}
        return {"ages": {key: ages.clone() for key, ages in young.items()},
                "seen": {key: self.seen[key] for key in young}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ages = {key: torch.as_tensor(ages, dtype=torch.int64).clone() for key, ages in state["ages"].items()}
        self.seen = {key: int(step) for key, step in state["seen"].items()}


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside a wrapper that steps it (accelerate's AcceleratedOptimizer, as the HF
    Trainer uses): its own step hooks then see every step."""
    while not isinstance(optimizer, (torch.optim.Adam, torch.optim.SGD)) and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _group_of(optimizer: torch.optim.Optimizer, parameter: Tensor) -> dict[str, Any] | None:
    return next((g for g in optimizer.param_groups if any(p is parameter for p in g["params"])), None)


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _new_parameter_update(before: Tensor, ages: Tensor, state: dict[str, Tensor], slots: Tensor, slot_dim: int,
                          settings: dict[str, Any]) -> Tensor:
    """The value after the k-th step of a new Adam(W) parameter that started this step at `before`
    (the order of torch's single-tensor Adam; float64)."""
    beta1, beta2 = settings["betas"]
    lr, eps, decay = settings["lr"], settings["eps"], settings["weight_decay"]
    shape = (-1,) + (1,) * (before.dim() - 1)
    k = ages.to(torch.float64).reshape(shape).to(before.device)
    exp_avg = state["exp_avg"].movedim(slot_dim, 0)[slots].to(torch.float64)
    second = state["max_exp_avg_sq" if settings["amsgrad"] else "exp_avg_sq"].movedim(slot_dim, 0)[slots]
    step_size = lr / (1 - beta1**k)
    denominator = second.to(torch.float64).sqrt() / (1 - beta2**k).sqrt() + eps
    value = before.to(torch.float64)
    if settings["decoupled"] and decay != 0:
        value = value * (1 - lr * decay)
    return value - step_size * exp_avg / denominator


def _caught_up(ages: Tensor, step: int, betas: tuple[float, float]) -> Tensor:
    """Slots whose bias corrections now equal their tensor's (the optimizer's own update is then theirs)."""
    k = ages.to(torch.float64)
    tensor_step = torch.full_like(k, float(step))
    same = torch.ones_like(k, dtype=torch.bool)
    for beta in betas:
        same &= (1 - beta**k) == (1 - beta**tensor_step)
    return same

"""Model Surgery (Wang et al., "Model Surgery: Modulating LLM's Behavior via Simple Parameter Editing",
NAACL 2025; official code: lucywang720/model-surgery).

Three steps, as in the paper's Fig. 1 and the official `modification/modify.py`:

1. **Behaviour probe** — a linear classifier of a binary behaviour (toxic / non-toxic in the paper) on the frozen
   model's hidden states, mean-pooled over non-padding tokens of the last layer (`train/run_pplm_discrim_train.py`
   pools `hidden_states[32]` of a 32-layer LLaMA). Its weight vector w is the behaviour direction.
2. **Region selection** — the rows of the gate projections (`mlp.gate_proj`, each row a vector in hidden space)
   with the most *negative* cosine similarity to w, ranked over all layers together; the official code keeps
   16,384 of the 32 x 11,008 LLaMA-2-7B gate rows (4.65%).
3. **Surgery** — θ_row ← θ_row + α·w for every selected row (α = 1.0 by default in `modify.py`, 1.08 in
   `scripts/eval.sh`). The rows were anti-aligned with the behaviour, so adding w switches those neurons on for
   behaviour-like inputs, which the paper reads as shifting the output away from the behaviour.

API: `train_probe`, `select_parameters` (pure: weights in, a `RowSelection` out), `apply_surgery` (pure unless
`in_place=True`), `row_weights` and `edit_model` for nn.Modules, `mean_pooled_hidden_states` for HF models.
`alignment="positive"` and a negative α are the mirrored variants (select aligned rows / subtract w).

Deviations from the paper / official code:
- the probe is a binary logistic regression (one weight vector, L2-regularised, full-batch L-BFGS in float64,
  deterministic) instead of a 2-way softmax head trained with Adam (lr 1e-4, 10-20 epochs) whose positive-class
  row is used; the softmax head's discriminative direction is the difference of its two rows, which is the
  logistic-regression weight, but its positive row alone also carries that row's random initialisation. The
  scale of w (hence the meaning of α) therefore differs from the paper's; `LinearProbe.unit_direction` gives
  a scale-free direction;
- the selection count is `SurgeryConfig.rows` or a fraction of all candidate rows (default 4.65%, the official
  16,384 / (32 x 11,008)) rather than a hard-coded 16,384, and any 2-D weights whose rows live in hidden space
  can be candidates (for BERT-style MLPs without a gate, `intermediate.dense` — our generalisation).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deltatune.errors import MergeError, config_check

PAPER_ROW_FRACTION = 16384 / (32 * 11008)  # modify.py: 4096 * 4 of LLaMA-2-7B's gate rows
ALIGNMENTS = ("negative", "positive")
DEFAULT_ROW_PATTERN = r"(mlp\.gate_proj|intermediate\.dense)$"


@dataclass(frozen=True)
class SurgeryConfig:
    """How many rows to edit (`rows`, or `row_fraction` of all candidates), the step α and the alignment."""

    row_fraction: float = PAPER_ROW_FRACTION
    rows: int | None = None
    alpha: float = 1.0
    alignment: str = "negative"

    def __post_init__(self) -> None:
        config_check(isinstance(self.row_fraction, (int, float)) and 0.0 < self.row_fraction <= 1.0,
                     "row_fraction", self.row_fraction, "a fraction in (0, 1]",
                     f"the paper edits {PAPER_ROW_FRACTION:.4f} of the gate rows")
        config_check(self.rows is None or (isinstance(self.rows, int) and self.rows >= 1), "rows", self.rows,
                     "None or an integer >= 1", "None uses row_fraction")
        config_check(isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha), "alpha", self.alpha,
                     "a finite number", "the official default is 1.0 (1.08 in its eval script)")
        config_check(self.alignment in ALIGNMENTS, "alignment", self.alignment, f"one of {ALIGNMENTS}",
                     "the paper selects the most negatively aligned rows")

    def row_count(self, candidates: int) -> int:
        """The number of rows to edit among `candidates` rows (at least one)."""
        if self.rows is not None:
            return self.rows
        return max(1, round(self.row_fraction * candidates))


# ---------------------------------------------------------------------------------------------------------
# Step 1: the behaviour probe
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearProbe:
    """A binary linear probe: P(behaviour | h) = sigmoid(h · weight + bias)."""

    weight: Tensor
    bias: float

    @property
    def unit_direction(self) -> Tensor:
        return self.weight / self.weight.norm()

    def logits(self, hidden_states: Tensor) -> Tensor:
        return hidden_states.to(self.weight.dtype) @ self.weight.to(hidden_states.device) + self.bias

    def probabilities(self, hidden_states: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(hidden_states))

    def accuracy(self, hidden_states: Tensor, labels: Tensor) -> float:
        predictions = (self.logits(hidden_states) > 0).long()
        return float((predictions == labels.to(predictions.device).long()).double().mean())


def _check_probe_data(hidden_states: Tensor, labels: Tensor) -> None:
    if hidden_states.dim() != 2 or hidden_states.shape[0] < 2 or hidden_states.shape[1] == 0:
        raise MergeError(f"hidden_states of shape {tuple(hidden_states.shape)} are invalid: expected (examples, "
                         "hidden size) with at least 2 examples; pool token states first")
    if labels.dim() != 1 or labels.shape[0] != hidden_states.shape[0]:
        raise MergeError(f"labels of shape {tuple(labels.shape)} do not match {hidden_states.shape[0]} hidden "
                         "states: expected one 0/1 label per example")
    values = set(labels.unique().tolist())
    if values != {0, 1}:
        raise MergeError(f"labels have values {sorted(values)}: expected both 0 (other) and 1 (the behaviour)")


def train_probe(hidden_states: Tensor, labels: Tensor, *, l2: float = 1e-3, max_iterations: int = 500
                ) -> LinearProbe:
    """Fit a logistic-regression behaviour probe on pooled hidden states (labels 1 = the behaviour).

    Minimises mean binary cross-entropy + l2/2·‖w‖² (bias unpenalised) with full-batch L-BFGS in float64 —
    deterministic, so no seed is needed. sklearn's LogisticRegression(C=1/(n·l2)) solves the same problem.
    """
    _check_probe_data(hidden_states, labels)
    config_check(l2 >= 0 and math.isfinite(l2), "l2", l2, "a finite number >= 0")
    features = hidden_states.detach().to(torch.float64)
    targets = labels.to(device=features.device, dtype=torch.float64)
    weight = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iterations, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ weight + bias, targets)
        loss = loss + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return LinearProbe(weight.detach().to(hidden_states.dtype), float(bias.detach()))


# ---------------------------------------------------------------------------------------------------------
# Step 2: region selection
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSelection:
    """Selected rows, most aligned first: (weight name, row index, cosine to the probe direction)."""

    entries: tuple[tuple[str, int, float], ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def rows(self) -> dict[str, Tensor]:
        """Weight name -> ascending indices of its selected rows."""
        grouped: dict[str, list[int]] = {}
        for name, row, _ in self.entries:
            grouped.setdefault(name, []).append(row)
        return {name: torch.tensor(sorted(rows), dtype=torch.long) for name, rows in grouped.items()}


def _check_direction(direction: Tensor, weights: Mapping[str, Tensor]) -> None:
    if direction.dim() != 1 or direction.numel() == 0 or float(direction.detach().norm()) == 0.0:
        raise MergeError(f"the probe direction of shape {tuple(direction.shape)} is invalid: expected a non-zero "
                         "flat vector (LinearProbe.weight)")
    for name, weight in weights.items():
        if weight.dim() != 2 or weight.shape[1] != direction.numel():
            raise MergeError(f"weight {name!r} has shape {tuple(weight.shape)}: expected (rows, "
                             f"{direction.numel()}) so each row lives in the probe's hidden space; pass the "
                             "input-side projections (gate_proj / intermediate.dense), or transpose")


def row_cosines(weight: Tensor, direction: Tensor) -> Tensor:
    """cos(row, direction) for every row, in float64 (a zero row has cosine 0)."""
    rows, vector = weight.detach().to(torch.float64), direction.detach().to(torch.float64).to(weight.device)
    norms = rows.norm(dim=1) * vector.norm()
    return torch.where(norms > 0, (rows @ vector) / norms.clamp_min(1e-300), torch.zeros_like(norms))


def select_parameters(weights: Mapping[str, Tensor], direction: Tensor, k: int, alignment: str = "negative"
                      ) -> RowSelection:
    """The k rows, over all weights together, most (anti-)aligned with `direction` (the paper's step 2).

    alignment="negative" (paper): lowest cosine first; "positive": highest first. Ties keep the mapping's
    order, then row order.
    """
    if len(weights) == 0:
        raise MergeError("no weights to select from: expected a mapping name -> 2-D weight; check the pattern "
                         "passed to row_weights()")
    config_check(alignment in ALIGNMENTS, "alignment", alignment, f"one of {ALIGNMENTS}")
    _check_direction(direction, weights)
    names = list(weights)
    cosines = [row_cosines(weights[name], direction).cpu() for name in names]
    total = sum(c.numel() for c in cosines)
    if not isinstance(k, int) or not 1 <= k <= total:
        raise MergeError(f"k={k!r} rows cannot be selected: expected an integer from 1 to {total} (the rows "
                         "available); lower k or row_fraction")
    flat = torch.cat(cosines)
    order = torch.sort(-flat if alignment == "negative" else flat, descending=True, stable=True).indices[:k]
    owners = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([c.numel() for c in cosines]))
    starts = torch.cumsum(torch.tensor([0] + [c.numel() for c in cosines[:-1]]), dim=0)
    entries = tuple((names[int(owners[i])], int(i - starts[owners[i]]), float(flat[i])) for i in order)
    return RowSelection(entries)


# ---------------------------------------------------------------------------------------------------------
# Step 3: the edit
# ---------------------------------------------------------------------------------------------------------

def apply_surgery(weights: Mapping[str, Tensor], selection: RowSelection, direction: Tensor, alpha: float = 1.0,
                  *, in_place: bool = False) -> dict[str, Tensor]:
    """θ_row ← θ_row + α·direction on every selected row (paper step 3); α < 0 moves the other way.

    Returns name -> tensor for every input weight: edited ones are new tensors (or the inputs themselves,
    edited, when `in_place=True`); unselected ones are the input objects, untouched.
    """
    _check_direction(direction, weights)
    unknown = sorted(set(selection.rows) - set(weights))
    if unknown:
        raise MergeError(f"the selection names weights {unknown} that are not given: pass the same mapping to "
                         "select_parameters and apply_surgery")
    config_check(math.isfinite(alpha), "alpha", alpha, "a finite number")
    edited = dict(weights)
    with torch.no_grad():
        for name, rows in selection.rows.items():
            target = weights[name] if in_place else weights[name].detach().clone()
            if int(rows.max()) >= target.shape[0]:
                raise MergeError(f"row {int(rows.max())} of {name!r} does not exist: the weight has "
                                 f"{target.shape[0]} rows; select rows on these same weights")
            step = (alpha * direction.detach().to(torch.float64)).to(device=target.device, dtype=target.dtype)
            target.index_add_(0, rows.to(target.device), step.expand(rows.numel(), -1))
            edited[name] = target
    return edited


def row_weights(model: nn.Module, pattern: str = DEFAULT_ROW_PATTERN) -> dict[str, nn.Parameter]:
    """`<module>.weight` -> parameter for every nn.Linear whose name matches `pattern` (re.search)."""
    found = {f"{name}.weight": module.weight for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and re.search(pattern, name)}
    if not found:
        raise MergeError(f"no nn.Linear module name matches {pattern!r}: expected e.g. 'mlp.gate_proj' (LLaMA) or "
                         "'intermediate.dense' (BERT); pass the pattern of the model's input-side MLP projection")
    return found


def edit_model(model: nn.Module, direction: Tensor, config: SurgeryConfig | None = None,
               pattern: str = DEFAULT_ROW_PATTERN) -> RowSelection:
    """Model Surgery on `model` **in place**: select rows of the matching layers, add α·direction to them."""
    config = config or SurgeryConfig()
    weights = row_weights(model, pattern)
    candidates = sum(weight.shape[0] for weight in weights.values())
    selection = select_parameters(weights, direction, config.row_count(candidates), config.alignment)
    apply_surgery(weights, selection, direction, config.alpha, in_place=True)
    return selection


@torch.no_grad()
def mean_pooled_hidden_states(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], layer: int = -1
                              ) -> Tensor:
    """Hidden states of `layer` (an index into `hidden_states`, -1 = last) averaged over non-padding tokens.

    `model` is a transformers model called with `output_hidden_states=True`; each batch holds `input_ids` and
    `attention_mask` (other keys are ignored). Returns (examples, hidden size) on the model's device.
    """
    pooled = []
    for batch in batches:
        mask = batch["attention_mask"]
        outputs = model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True)
        states = outputs.hidden_states[layer]
        weights = mask.to(states.device, states.dtype).unsqueeze(-1)
        pooled.append((states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0))
    if not pooled:
        raise MergeError("no batches were given: expected at least one batch of input_ids / attention_mask")
    return torch.cat(pooled)

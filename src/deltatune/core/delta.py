"""The delta contract: what every layer method implements, and nothing about hosting, saving or merging mechanics.

A delta changes what one base layer computes. It declares where it acts (`kind`):

- ``WEIGHT``: in weight space, the layer runs with ``W' = adapted_weight(W)`` (sparse, multiplicative, ...);
- ``ADDITIVE``: ``forward(x)`` is added to the base output, on the activation path (low rank: ``B(A x)``);
- ``OUTPUT``: ``transform_output(y)`` maps the layer's output (SSF, sequential adapters);
- ``INPUT``: ``forward_around(run, args, kwargs)`` wraps the whole call of the module it is hosted on, so it can
  change the call's inputs and undo that on its output: prompt tokens inserted into (or replacing slots of) a
  block's input, an extended attention mask, an input transform. The host of an INPUT delta may be any module
  (layer kind ``MODULE``: an embedding block, a transformer block, a backbone; a plain ``nn.Module`` works the
  same as a transformers one). INPUT deltas are never mergeable.

Besides ΔW, a delta may change the layer's bias: `delta_bias(b)` is Δb in the bias's shape (None when it leaves
the bias alone), and merging, combining and the delta algebra read it wherever they read ΔW.

Several active deltas on one layer compose in that order: weight-space deltas first, then additive ones, then
output transforms; within a kind, in the order of the active set (`deltatune.set_active(model, [...])`; adapt
order when each was activated as added). Merging folds them in the same order and unmerging undoes it in
reverse. The host (`core.host.AdaptedLayer`) owns the composition, merging mechanics, activation and
device/dtype handling; a method file only fills in this class.
"""
from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar

from torch import Tensor, nn

from deltatune.core.config import DeltaConfig
from deltatune.core.layers import LINEAR, LayerInfo, base_bias
from deltatune.errors import NotMergeableError


class DeltaKind(str, Enum):
    INPUT = "input"
    WEIGHT = "weight"
    ADDITIVE = "additive"
    OUTPUT = "output"


# INPUT deltas wrap the whole call (outermost), so the layer deltas inside see the prompted inputs.
COMPOSITION_ORDER = (DeltaKind.INPUT, DeltaKind.WEIGHT, DeltaKind.ADDITIVE, DeltaKind.OUTPUT)


class Delta(nn.Module):
    """Base class of every layer delta.

    Subclasses set `kind`, `layer_kinds` (the `core.layers` kinds they support) and implement
    `delta_weight`, plus `forward` (ADDITIVE) or `transform_output` (OUTPUT). Their parameter and
    persistent-buffer names are the saved file format: document them in the method's docstring.
    """

    kind: ClassVar[DeltaKind] = DeltaKind.WEIGHT
    layer_kinds: ClassVar[frozenset[str]] = frozenset({LINEAR})
    mergeable: ClassVar[bool] = True
    # True when the paper initializes the delta so that the adapted model equals the base model at step 0.
    preserves_output_at_init: ClassVar[bool] = True
    # True for a weight-space delta whose adapted weight does not read the weight it is given (SketchTune: the
    # sketch replaces W). Stacked after other weight-space deltas, such a delta alone decides the layer's weight.
    replaces_base_weight: ClassVar[bool] = False

    def __init__(self, config: DeltaConfig, layer: LayerInfo, module_name: str = "") -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.module_name = module_name

    def init_from_module(self, module: nn.Module) -> None:
        """Called once after construction with the module this delta will be hosted on (on its device and
        dtype). The default hands a layer's weight and bias to `init_from_base`; input-side deltas that need
        more (prompts initialized from the vocabulary embeddings) override this."""
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            bias = base_bias(module)
            self.init_from_base(weight.detach(), None if bias is None else bias.detach())

    def init_from_base(self, base_weight: Tensor, base_bias: Tensor | None) -> None:
        """Called once after construction (on the base's device and dtype) for data-dependent initialization
        (PiSSA-like SVD inits, SaRA's magnitude selection). The default does nothing."""

    # --- the math -----------------------------------------------------------------------------------------
    def delta_weight(self, base_weight: Tensor) -> Tensor:
        """ΔW in the base weight's native shape, such that the adapted layer equals the base layer with W + ΔW
        (for OUTPUT deltas, the weight change of the folded form). Used by merging and the delta algebra."""
        raise NotImplementedError

    def delta_bias(self, base_bias: Tensor | None) -> Tensor | None:
        """Δb in the base bias's shape (out,), such that the adapted layer equals the base layer with
        (W + ΔW, b + Δb) (for OUTPUT deltas, the bias change of the folded form); None (the default) when the
        delta leaves the bias alone. BitFit's whole update is here. Read by merging and the delta algebra."""
        return None

    def adapted_weight(self, base_weight: Tensor) -> Tensor:
        """The weight the layer runs with on the weight path. Multiplicative methods override this."""
        return base_weight + self.delta_weight(base_weight)

    def forward(self, x: Tensor) -> Tensor:  # ADDITIVE deltas: the term added to the base output
        raise NotImplementedError(f"{type(self).__name__} has no activation path")

    def transform_output(self, y: Tensor) -> Tensor:  # OUTPUT deltas
        raise NotImplementedError(f"{type(self).__name__} does not transform outputs")

    def forward_around(self, module: nn.Module, run: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """INPUT deltas: call ``run(*args, **kwargs)`` (the hosted `module` with its other deltas) with changed
        inputs and return its output, changed back where needed (prompt positions dropped). `module` is the
        hosted module, for reading (its input embedding, say); call `run`, never `module`, to compute."""
        raise NotImplementedError(f"{type(self).__name__} does not act on inputs")

    @property
    def routes_per_sample(self) -> bool:
        """True when the delta can run on some rows of a batch alone, so that one batch can mix adapters
        (`deltatune.route`): sample i's change depends on sample i only, and is computed on the activation path.
        ADDITIVE and OUTPUT deltas can by default; WEIGHT deltas change the one weight every row shares and
        INPUT deltas change the call itself, so they cannot. A method whose term mixes rows returns False."""
        return self.kind in (DeltaKind.ADDITIVE, DeltaKind.OUTPUT)

    def regularization(self) -> Tensor | None:
        """A penalty the trainer adds to the loss (orthogonality, nuclear norm, ...), or None."""
        return None

    # --- merging: folded into (weight, bias) and back ------------------------------------------------------
    def merge_into(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Return the (weight, bias) of a plain layer that computes what base + this delta computes."""
        self._require_mergeable()
        return self.adapted_weight(weight), self._shifted_bias(bias, +1.0)

    def unmerge_from(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Exact inverse of `merge_into` for deltas whose ΔW and Δb do not depend on (W, b); others override."""
        self._require_mergeable()
        return weight - self.delta_weight(weight), self._shifted_bias(bias, -1.0)

    def _shifted_bias(self, bias: Tensor | None, sign: float) -> Tensor | None:
        """bias ± Δb; the bias unchanged when the delta has no Δb."""
        change = self.delta_bias(bias)
        if change is None:
            return bias
        if bias is None:
            raise NotMergeableError(
                f"{type(self).__name__} on {self.module_name or 'this layer'} changes a bias the base layer does not "
                "have; keep the adapter unmerged"
            )
        return bias + sign * change.detach().to(dtype=bias.dtype, device=bias.device)

    def _require_mergeable(self) -> None:
        if not self.mergeable:
            raise NotMergeableError(
                f"{type(self).__name__} on {self.module_name or 'this layer'} cannot be merged into the base "
                "weights; keep the adapter unmerged (or unload with merge=False)"
            )

    # --- printing ------------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return f"kind={self.kind.value}, layer={self.layer.kind}({self.layer.in_features}->{self.layer.out_features})"

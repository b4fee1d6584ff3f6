"""Errors meant for people: each message says what was wrong, what was expected, and the fix."""
from __future__ import annotations


class DeltatuneError(Exception):
    """Base class of every error deltatune raises on purpose. The CLI prints these as one line."""


class ConfigError(DeltatuneError, ValueError):
    """A hyper-parameter is outside its allowed range."""


class TargetError(DeltatuneError, ValueError):
    """Module targeting matched nothing, or matched a layer the method cannot adapt."""


class UnsupportedLayerError(TargetError):
    """The method has no form for this layer type."""


class AdapterNameError(DeltatuneError, ValueError):
    """An adapter name is unknown, or already taken."""


class NotMergeableError(DeltatuneError):
    """The delta cannot be folded into the base weights (or cannot be exactly un-folded)."""


class AdapterFileError(DeltatuneError, OSError):
    """An adapter or checkpoint file is missing, corrupt, unsafe, or does not fit the model."""


class TrainingError(DeltatuneError, RuntimeError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class MergeError(DeltatuneError, ValueError):
    """Checkpoints or deltas cannot be merged as asked (mismatched names, shapes, dtypes, weights)."""


class BenchmarkError(DeltatuneError, RuntimeError):
    """A benchmark run failed (its child process exited with an error, or printed no result)."""


def config_check(condition: bool, field: str, value: object, expected: str, fix: str = "") -> None:
    """Raise a ConfigError naming the field, the bad value and the allowed range unless `condition` holds."""
    if not condition:
        message = f"{field}={value!r} is invalid: expected {expected}"
        raise ConfigError(message + (f"; {fix}" if fix else "."))


class RoutingError(DeltatuneError, ValueError):
    """A per-sample adapter routing cannot be done (an unknown name, a method that cannot route, a batch size
    that does not match the names)."""


class HotSwapError(DeltatuneError, ValueError):
    """An adapter cannot replace a loaded one in place (other targets, other method, a rank above the maximum)."""

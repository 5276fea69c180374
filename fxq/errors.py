"""The one exception hierarchy fxq raises for problems a user can act on.

Every message names the module or node involved and says what to do next; fxq never
lets a raw torch.fx stack trace escape for an expected failure.
"""


class FxqError(Exception):
    """Base class of every error fxq raises on purpose."""


class InvalidInputError(FxqError, TypeError):
    """The model, example inputs or calibration data are not what fxq needs."""


class TraceFailure(FxqError):
    """The model (or a part fxq needed to trace) could not be captured as a graph."""


class RewriteError(FxqError):
    """A graph rewrite produced a float graph that differs from the original."""


class BackendError(FxqError, KeyError):
    """An unknown backend name, a broken backend plugin, or a backend constraint violated."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class CalibrationError(FxqError, ValueError):
    """Calibration data is empty, malformed, or contains NaN/Inf."""


class QuantizationFailure(FxqError):
    """prepare/convert failed in a way fxq could not repair by keeping nodes in float."""


class DistributedError(FxqError, RuntimeError):
    """Observers cannot be merged over torch.distributed ranks: the ranks hold different models,
    or an observer type fxq does not know how to merge."""

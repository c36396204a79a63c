"""The non-finite guard shared by pretraining and fine-tuning.

A step whose loss (or gradient norm) is not finite is skipped, not applied, and counted; too many
in a row stop the run with :class:`NonFiniteError`. Weights are checked where a model enters a run
(a loaded checkpoint) and where it leaves one (a saved model), so a NaN model is neither trained
from nor written as a result.
"""

from __future__ import annotations

from torch import nn


class NonFiniteError(RuntimeError):
    """Training produced (or was given) non-finite values it cannot recover from."""


class NonFiniteGuard:
    """Counts skipped steps; ``skip`` says whether the run may go on."""

    def __init__(self, max_consecutive: int, hint: str = "try a lower --lr, more warmup or --precision "
                                                         "bf16/fp32") -> None:
        self.max_consecutive = max_consecutive
        self.hint = hint
        self.consecutive = 0
        self.skipped = 0

    def ok(self) -> None:
        self.consecutive = 0

    def skip(self) -> None:
        """Count a skipped step (``exhausted`` says whether the run must stop)."""
        self.consecutive += 1
        self.skipped += 1

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_message(self) -> str:
        return f"stopping: {self.consecutive} consecutive steps had a non-finite loss or gradient norm; {self.hint}"


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or an infinity."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(t.isfinite().all())]


def check_finite_model(model: nn.Module, what: str, error: type[Exception] = NonFiniteError) -> None:
    """Raise ``error`` naming the tensors of ``model`` that are not finite."""
    bad = non_finite_parameters(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise error(f"{what} has non-finite weights ({shown})")

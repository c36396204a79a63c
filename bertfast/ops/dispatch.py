"""Which backend runs an op: one table, consulted once per call.

Each backend entry is a function with the op's signature and, next to it, a ``supports(*tensors,
**options)`` predicate over the op's tensors (device, dtype, sizes) and options. For a call, the
candidates are the forced backend (:func:`use_backend`, else ``BERTFAST_BACKEND``, read once when
bertfast is imported) or, unforced, ``triton`` for CUDA tensors and ``native`` for the others; the
first candidate whose predicate accepts the call runs it, and when none does, the reference
(``torch``) runs it. The kernels' entry points do not check again: what :func:`implementation`
reports is what runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from bertfast.ops import reference

BACKENDS = ("torch", "triton", "native")
OPS = ("embeddings", "bias_gelu", "bias_dropout_add_layernorm", "bias_gelu_layernorm", "attention",
       "linear_cross_entropy", "pooling", "rotary", "geglu")
ENVIRONMENT_VARIABLE = "BERTFAST_BACKEND"


@dataclass(frozen=True)
class Entry:
    fn: Callable  # the op's implementation, with the op's signature
    supports: Callable[..., bool]  # (*tensors, **options) -> whether ``fn`` takes this call


_TABLE: dict[str, dict[str, Entry]] = {op: {} for op in OPS}


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool]) -> None:
    _TABLE[op][_check_backend(backend)] = Entry(fn, supports)


def backends_of(op: str) -> tuple[str, ...]:
    """The backends that implement ``op`` on this installation (besides the reference)."""
    return tuple(_TABLE[op])


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown bertfast backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def read_environment() -> str | None:
    """(Re)read ``BERTFAST_BACKEND``; bertfast does this once, at import."""
    global _environment
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    _environment = _check_backend(value) if value else None
    return _environment


_environment: str | None = None
read_environment()
_forced: str | None = None


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``BERTFAST_BACKEND``, if any."""
    return _forced if _forced is not None else _environment


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for the ops called inside the block (``None`` restores automatic choice)."""
    global _forced
    previous = _forced
    _forced = _check_backend(name) if name is not None else None
    try:
        yield
    finally:
        _forced = previous


def _device_type(tensors: tuple[Tensor | None, ...]) -> str:
    for t in tensors:
        if t is not None:
            return t.device.type
    raise ValueError("implementation() needs at least one tensor")


def implementation(op: str, *tensors: Tensor | None, **options) -> tuple[str, Callable]:
    """(backend, function) that runs ``op`` for these tensors (and options, e.g. ``approximate``).

    The tensors are the op's inputs that decide (``implementation("bias_gelu", x)`` is enough for most
    questions: one tensor stands for all of them).
    """
    entries = _TABLE[op]
    forced = forced_backend()
    if forced is not None:
        candidates = (forced,)
    else:
        candidates = ("triton",) if _device_type(tensors) == "cuda" else ("native",)
    for backend in candidates:
        entry = entries.get(backend)
        if entry is not None and entry.supports(*tensors, **options):
            return backend, entry.fn
    return "torch", getattr(reference, op)

"""How bertfast defines its custom operators (``torch.library``, namespace ``bertfast::``).

Every op made here has a schema (inferred from the type hints), a fake implementation that gives the
output shapes from the input shapes alone (the packed token count may be an unbacked ``SymInt`` under
``torch.compile``, so neither the fake nor the real implementation may branch on it), and its
autograd registered separately (``register_autograd`` with ``setup_context``).

:func:`kernel_op` defines an op whose implementation launches Triton kernels: a
``torch.library.triton_op`` (``torch.compile`` and Inductor see the kernels through ``wrap_triton``),
or, when Triton runs in its interpreter (``TRITON_INTERPRET=1``, CPU tensors: how the tests run the
kernels without a GPU), a plain ``custom_op``, since Inductor cannot compile interpreted kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

NAMESPACE = "bertfast"
# Triton reads the variable when its kernels are decorated; bertfast reads it once too.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def custom_op(name: str, fake: Callable, device_types: str | None = None) -> Callable:
    """``@custom_op("name", fake)``: the decorated function is ``bertfast::name``'s implementation."""

    def define(fn: Callable) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=(), device_types=device_types)
        op.register_fake(fake)
        return op

    return define


def kernel_op(name: str, fake: Callable, traceable: bool = True) -> Callable:
    """``@kernel_op("name", fake)``: an op whose implementation launches Triton kernels.

    ``traceable=False`` keeps the op opaque to the compiler even on a GPU, for a launcher whose
    structure depends on tensor values (a loop over a data-dependent number of chunks).
    """

    def define(fn: Callable) -> torch.library.CustomOpDef:
        qualified = f"{NAMESPACE}::{name}"
        if traceable and not TRITON_INTERPRETED:
            op = torch.library.triton_op(qualified, fn, mutates_args=())
        else:
            op = torch.library.custom_op(qualified, fn, mutates_args=())
        # The shape-only fake replaces triton_op's default (the launcher itself traced on fake tensors).
        op.register_fake(fake)
        return op

    return define



# While not None, the launches that wrap_triton would make are appended here instead of run (kernels/aot.py).
_recorded_launches: list | None = None


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``: how every launcher launches its kernels (so that
    ``torch.compile`` sees them inside ``triton_op``s), except while ``bertfast.kernels.aot.record``
    collects the launches that a launcher makes, to derive the ahead-of-time compile signatures."""
    if _recorded_launches is not None:
        return _Recorder(kernel)
    return torch.library.wrap_triton(kernel)


class _Recorder:
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            _recorded_launches.append((self.kernel, args, kwargs))

        return launch

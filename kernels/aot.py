"""How a kernel module declares the compilations that the ahead-of-time check must try.

Every module in ``bertfast.kernels`` that defines ``aot_specs() -> list[AotSpec]``
joins ``python -m bertfast.kernels.check`` automatically: one spec per
(kernel, configuration) that its launcher can choose. The check compiles each spec twice
where it is tuned: once as an odd shape reaches it (no argument known to be a multiple of
16) and once as a BERT shape does (every pointer and integer a multiple of 16, so Triton
vectorises as it will at run time).

Signatures are not written by hand: :func:`record` runs a launcher on meta tensors and
collects the launches it would make, and :func:`spec` turns one into an AotSpec, with each
argument's Triton type read from the value passed (a tensor's dtype, an int, a float, None)
and the constexpr arguments' values as the launcher chose them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bertfast.common import library


@dataclass(frozen=True)
class AotSpec:
    name: str  # what the check's table calls this compilation, e.g. "bias_gelu_fwd[H=768,bf16]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # every argument -> Triton type ("*fp32", "*bf16", "i32", "fp32", "constexpr")
    constants: dict[str, Any] = field(default_factory=dict)  # value of each "constexpr" argument
    num_warps: int = 4
    num_stages: int = 3
    tuned: bool = True  # a configuration the launcher prefers: spills here fail the check
    # Which compute capabilities (80, 86, 90, ...) the launcher picks this configuration on; None: all of them.
    # The check compiles a spec only for those, so a Hopper table need not also fit an A100.
    capabilities: Callable[[int], bool] | None = None

    def used_on(self, capability: int) -> bool:
        return self.capabilities is None or self.capabilities(capability)


@dataclass(frozen=True)
class Launch:
    kernel: Any  # the @triton.jit function
    args: dict[str, Any]  # every kernel argument by name, as the launcher passed it
    options: dict[str, Any]  # num_warps, num_stages


_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
    torch.uint8: "u8",
}


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor without data, for a launcher run under :func:`record`."""
    return torch.empty(shape, dtype=dtype, device="meta")


def record(launcher: Callable, *args: Any) -> list[Launch]:
    """The kernel launches that ``launcher(*args)`` makes (given meta tensors), without running any."""
    library._recorded_launches = []
    try:
        launcher(*args)
        launches = library._recorded_launches
    finally:
        library._recorded_launches = None
    return [_bind(kernel, args, kwargs) for kernel, args, kwargs in launches]


def _python_fn(kernel) -> Callable:
    return kernel.fn  # JITFunction and the interpreter's InterpretedFunction both keep the Python function


def _bind(kernel, args: tuple, kwargs: dict) -> Launch:
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = inspect.signature(_python_fn(kernel)).bind(*args, **kwargs)
    return Launch(kernel, dict(bound.arguments), options)


def _triton_type(name: str, value: Any) -> str:
    if value is None:
        return "constexpr"  # Triton specialises a None argument as a constant
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name} = {value!r}: no Triton type for it")


def spec(name: str, launch: Launch, *, tuned: bool = True, capabilities: Callable[[int], bool] | None = None
         ) -> AotSpec:
    """The AotSpec of one recorded launch: its kernel, signature, constants and launch options."""
    params = inspect.signature(_python_fn(launch.kernel)).parameters
    signature, constants = {}, {}
    for arg, value in launch.args.items():
        if "constexpr" in str(params[arg].annotation):
            signature[arg] = "constexpr"
            constants[arg] = value
        else:
            signature[arg] = _triton_type(arg, value)
            if value is None:
                constants[arg] = None
    return AotSpec(name, launch.kernel, signature, constants, num_warps=launch.options.get("num_warps", 4),
                   num_stages=launch.options.get("num_stages", 3), tuned=tuned, capabilities=capabilities)

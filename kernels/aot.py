"""How a kernel module declares the compilations that the ahead-of-time check must try.

Every module in ``bertfast.kernels`` that defines ``aot_specs() -> list[AotSpec]``
joins ``python -m bertfast.kernels.check`` automatically: one spec per
(kernel, configuration) that its launcher can choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AotSpec:
    name: str  # what the check's table calls this compilation, e.g. "bias_gelu_fwd[H=768,bf16]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # every argument -> Triton type ("*fp32", "*bf16", "i32", "fp32", "constexpr")
    constants: dict[str, Any] = field(default_factory=dict)  # value of each "constexpr" argument
    num_warps: int = 4
    num_stages: int = 3
    tuned: bool = True  # a configuration the launcher prefers: spills here fail the check

"""How a kernel module declares the compilations that the ahead-of-time check must try.

Every module in ``bertfast.kernels`` that defines ``aot_specs() -> list[AotSpec]``
joins ``python -m bertfast.kernels.check`` automatically: one spec per
(kernel, configuration) that its launcher can choose. The check compiles each spec twice
where it is tuned: once as an odd shape reaches it (no argument known to be a multiple of
16) and once as a BERT shape does (every pointer and integer a multiple of 16, so Triton
vectorises as it will at run time).
"""

from __future__ import annotations

from collections.abc import Callable
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
    # Which compute capabilities (80, 86, 90, ...) the launcher picks this configuration on; None: all of them.
    # The check compiles a spec only for those, so a Hopper table need not also fit an A100.
    capabilities: Callable[[int], bool] | None = None

    def used_on(self, capability: int) -> bool:
        return self.capabilities is None or self.capabilities(capability)

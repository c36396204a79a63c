"""Reduced-precision CPU inference, opt-in: bf16 weights and activations, or int8 Linear layers.

    model = bertfast.for_cpu_inference(model, "bf16")   # AVX512-BF16 / AMX: bf16 matmuls, fp32 accumulation
    model = bertfast.for_cpu_inference(model, "int8")   # int8 Linear layers (AVX2, VNNI, AMX), fp32 elsewhere

Both work on bertfast's models and on transformers models (accelerated or not). Each checks that
the CPU has the instructions it is fast with and refuses, naming them, when it does not: on such
a CPU the reduced precision would cost accuracy and buy no speed. Accuracy on the real MiniLM-L6
(sentence-embedding cosine, classification agreement) is tested in tests/test_inference.py and
measured in benchmarks/bench_inference.py.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
from torch import nn

from bertfast.prepacked import Int8Linear

PRECISIONS = ("fp32", "bf16", "int8")
# What each precision needs, as /proc/cpuinfo names the flags: any one of a group suffices.
# int8 runs exactly on AVX2 too, with weights in [-64, 64] (bertfast.prepacked.int8_weight_levels).
REQUIRED_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "int8": ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def check_cpu_supports(precision: str, flags: frozenset[str] | None = None) -> None:
    """Raise RuntimeError naming the missing instructions when this CPU cannot run ``precision`` fast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    needed = REQUIRED_FLAGS.get(precision)
    if needed is None:
        return
    flags = cpu_flags() if flags is None else flags
    if not flags.intersection(needed):
        where = "could not read the CPU's flags" if not flags else f"this CPU ({platform.machine()}) has none of them"
        raise RuntimeError(
            f"{precision} CPU inference needs one of the instruction sets {', '.join(needed)}; {where}. "
            "Use fp32 on this machine."
        )


def quantize_linear_layers(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` in ``model`` with an :class:`Int8Linear`; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
                replaced += 1
    return replaced


def for_cpu_inference(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Put ``model`` in eval mode on the CPU in ``precision`` (fp32, bf16 or int8), in place; returns it.

    bf16 converts parameters and activations to bfloat16 (matmuls on AVX512-BF16/AMX; the fused
    ops accumulate in fp32). int8 replaces every ``nn.Linear`` with an :class:`Int8Linear`, whose
    weights bertfast's encoder layers run in int8 (``bertfast.prepacked``); the rest stays fp32.
    """
    check_cpu_supports(precision)
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("for_cpu_inference takes a model on the CPU; call model.cpu() first")
    model.eval()
    if precision == "bf16":
        model.to(torch.bfloat16)
    elif precision == "int8":
        with torch.no_grad():
            quantize_linear_layers(model)
    return model

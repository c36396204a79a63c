"""Loading the C++ ops: without the built library, or with a library built for another torch, there is no
native backend and the reference runs (with a warning for the version mismatch)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import importlib.util, warnings
import torch
{setup}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from bertfast import ops
x = torch.randn(3, 8)
print(ops.implementation("bias_gelu", x)[0], ops.implementation("linear_cross_entropy", x)[0])
print(torch.equal(ops.bias_gelu(x, None), torch.nn.functional.gelu(x)))
print(" | ".join(str(w.message) for w in caught if "bertfast" in str(w.message)))
"""


def probe(setup: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                            check=True)
    return result.stdout.strip().splitlines()


def test_the_built_library_is_the_native_backend():
    assert probe("")[:2] == ["native native", "False"]  # the kernel's GELU, not bit-equal to PyTorch's


def test_without_the_library_the_reference_runs():
    lines = probe("""
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "bertfast._C" else real(name, *a)""")
    # The chunked MLM loss is plain PyTorch: it needs no library.
    assert lines[:2] == ["torch native", "True"]


def test_a_library_built_for_another_torch_stays_off_with_a_warning():
    lines = probe('torch.__version__ = "2.0.0+other"')
    assert lines[:2] == ["torch native", "True"]
    assert "built for torch 2.13" in lines[2] and "not for this torch 2.0.0+other" in lines[2]

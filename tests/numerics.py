"""Tolerance rules shared by the kernel tests."""

from __future__ import annotations

import torch
from torch import Tensor


def max_abs_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_relative_rule(
    actual: Tensor, ref_fp32: Tensor, ref_same_dtype: Tensor, atol: float = 1e-5, factor: float = 2.0,
    name: str = "output",
) -> None:
    """The kernel's error against an fp32 reference is at most ``factor`` times PyTorch's own
    error in the same dtype, plus ``atol``."""
    assert actual.shape == ref_fp32.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref_fp32.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = max_abs_err(actual, ref_fp32)
    torch_err = max_abs_err(ref_same_dtype, ref_fp32)
    bound = factor * torch_err + atol
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x torch's {torch_err:.3e} + {atol:.1e}"

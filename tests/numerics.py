"""Tolerance rules shared by the kernel tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of one rounding in ``dtype``."""
    return torch.finfo(dtype).eps / 2


def sum_rounding_bound(abs_terms_sum: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A bound on the rounding error of sums of ``k`` terms in ``dtype``, in any order of summation:
    ``sqrt(k) * u * sum(|terms|)``, elementwise over ``abs_terms_sum`` (each sum's sum of absolute terms).

    The worst case grows as ``k * u``; rounding errors that are independent and of mean zero grow as
    ``sqrt(k) * u`` (Higham and Mary, "A new approach to probabilistic rounding error analysis", 2019),
    which is what blocked and vectorised GEMMs show. Two implementations each within the bound differ by
    at most twice it; tests leave a further factor of two for the constant of that analysis."""
    return math.sqrt(k) * unit_roundoff(dtype) * abs_terms_sum


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


def assert_matches_reference(
    names: tuple[str, ...], actual: tuple[Tensor, ...], ref_fp32: tuple[Tensor, ...],
    ref_same_dtype: tuple[Tensor, ...],
) -> None:
    """Each named output or gradient against the references: the reference's dtype; in fp32 within 1e-5 of
    the fp32 reference; in bf16/fp16 the relative rule with one unit in the last place (of the largest
    value) for atol."""
    for name, a, r32, rs in zip(names, actual, ref_fp32, ref_same_dtype, strict=True):
        assert a.dtype == rs.dtype, name
        scale = max(r32.abs().max().item(), 1.0) if r32.numel() else 1.0
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, r32, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
        else:
            ulp = 2.0**-8 if a.dtype == torch.bfloat16 else 2.0**-11
            assert_relative_rule(a, r32, rs, atol=ulp * scale, name=name)

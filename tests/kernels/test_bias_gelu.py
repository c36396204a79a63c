"""Triton bias+GELU (interpreter on CPU) against the reference: output, dx and dbias."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.kernels import bias_gelu as kernel
from bertfast.ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(fn, x, bias, grad, approximate):
    x = x.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    y = fn(x, bias, approximate)
    return (y.detach(), *torch.autograd.grad(y, (x, bias), grad))


def check(x, bias, approximate="none"):
    """Kernel vs the fp32 reference: tight in fp32, the relative rule in bf16/fp16."""
    grad = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    actual = run(kernel.bias_gelu, x, bias, grad, approximate)
    ref32 = run(reference.bias_gelu, x.float(), bias.float(), grad.float(), approximate)
    names = ("output", "grad x", "grad bias")
    ref_same = run(reference.bias_gelu, x, bias, grad, approximate)
    assert_matches_reference(names, actual, ref32, ref_same)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,cols", [(1, 8), (3, 384), (127, 768), (3, 1000), (5, 3072)])
def test_fp32_matches_reference(rows, cols, approximate):
    check(torch.randn(rows, cols) * 2, torch.randn(cols), approximate)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("rows,cols", [(1, 8), (127, 1024), (3, 1000)])
def test_half_precision_relative_rule(rows, cols, dtype):
    dt = DTYPES[dtype]
    check((torch.randn(rows, cols) * 2).to(dt), torch.randn(cols).to(dt))


def test_extra_leading_dims_and_zero_rows():
    check(torch.randn(2, 3, 40), torch.randn(40))
    x = torch.randn(0, 16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    y = kernel.bias_gelu(x, bias)
    assert y.shape == (0, 16)
    dx, dbias = torch.autograd.grad(y.sum(), (x, bias))
    assert dx.shape == (0, 16) and torch.equal(dbias, torch.zeros(16))


def test_output_dtype_follows_promotion_like_the_reference():
    x = torch.randn(4, 32).to(torch.bfloat16)
    bias = torch.randn(32)
    assert kernel.bias_gelu(x, bias).dtype == reference.bias_gelu(x, bias).dtype == torch.float32
    check(x, bias)  # and every dtype (fp32 output, bf16 dx, fp32 dbias) as the reference has it


def test_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        ops.bias_gelu(torch.randn(2, 8), torch.randn(8), "sigmoid")


def test_ops_routes_to_the_kernel_under_the_triton_backend():
    x = torch.randn(3, 64, requires_grad=True)
    bias = torch.randn(64)
    with ops.use_backend("triton"):
        backend, fn = ops.implementation("bias_gelu", x)
        y = ops.bias_gelu(x, bias)
    assert backend == "triton" and fn is kernel.bias_gelu
    assert "bertfast_bias_gelu_triton" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, reference.bias_gelu(x, bias), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_matches_reference(dtype):
    dt = DTYPES[dtype]
    check((torch.randn(4096, 3072, device="cuda") * 2).to(dt), torch.randn(3072, device="cuda").to(dt))

"""Triton bias+GELU+LayerNorm (interpreter on CPU) against the reference, with every gradient."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.kernels import bias_gelu_layernorm as kernel
from bertfast.ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("output", "grad x", "grad bias", "grad ln weight", "grad ln bias")
EPS = 1e-12


def make_inputs(rows: int, hidden: int, dtype=torch.float32, lead=()):
    x = torch.randn(*lead, rows, hidden) * 2
    bias, ln_weight, ln_bias = torch.randn(hidden), 1 + 0.2 * torch.randn(hidden), 0.1 * torch.randn(hidden)
    return [t.to(dtype) for t in (x, bias, ln_weight, ln_bias)]


def run(fn, inputs, grad, approximate="none"):
    """(output, grad x, grad bias, grad ln weight, grad ln bias)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs, EPS, approximate)
    return (y.detach(), *torch.autograd.grad(y, inputs, grad))


def check(inputs, approximate="none"):
    x = inputs[0]
    grad = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    actual = run(kernel.bias_gelu_layernorm, inputs, grad, approximate)
    ref32 = run(reference.bias_gelu_layernorm, [t.float() for t in inputs], grad.float(), approximate)
    ref_same = run(reference.bias_gelu_layernorm, inputs, grad, approximate)
    assert_matches_reference(NAMES, actual, ref32, ref_same)


@pytest.mark.parametrize(
    "rows,hidden", [(1, 8), (3, 384), (127, 768), (3, 1000), (1, 1024), (127, 1024), (2, 4096)]
)
def test_fp32_matches_reference(rows, hidden):
    check(make_inputs(rows, hidden))


@pytest.mark.parametrize("rows,hidden", [(1, 8), (127, 768)])
def test_tanh_approximation(rows, hidden):
    check(make_inputs(rows, hidden), approximate="tanh")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("rows,hidden", [(1, 8), (3, 1000), (127, 768)])
def test_half_precision_relative_rule(rows, hidden, dtype):
    check(make_inputs(rows, hidden, DTYPES[dtype]))


@pytest.mark.parametrize("rows,hidden", [(3, 384), (127, 768)])
def test_autocast_mix_of_bf16_activation_and_fp32_parameters(rows, hidden):
    x, *rest = make_inputs(rows, hidden)
    check([x.bfloat16(), *rest])


def test_extra_leading_dims_and_zero_rows():
    check(make_inputs(3, 40, lead=(2,)))
    out, dx, dbias, dw, db = run(kernel.bias_gelu_layernorm, make_inputs(0, 32), torch.zeros(0, 32))
    assert out.shape == dx.shape == (0, 32)
    for g in (dbias, dw, db):
        assert torch.equal(g, torch.zeros(32))


def test_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        run(ops.bias_gelu_layernorm, make_inputs(2, 8), torch.zeros(2, 8), approximate="erf")


def test_ops_routes_to_the_kernel_under_the_triton_backend():
    inputs = [t.requires_grad_() for t in make_inputs(3, 64)]
    with ops.use_backend("triton"):
        backend, fn = ops.implementation("bias_gelu_layernorm", inputs[0])
        y = ops.bias_gelu_layernorm(*inputs, EPS)
    assert backend == "triton" and fn is kernel.bias_gelu_layernorm
    assert "bertfast_bias_gelu_layernorm_triton" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, reference.bias_gelu_layernorm(*inputs, EPS), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [768, 1024])
def test_cuda_matches_reference(hidden, dtype):
    check([t.cuda() for t in make_inputs(4096, hidden, DTYPES[dtype])])

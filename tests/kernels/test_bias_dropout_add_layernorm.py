"""Triton bias+dropout+add+LayerNorm (interpreter on CPU) against the reference, with every gradient."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.kernels import bias_dropout_add_layernorm as kernel
from bertfast.ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("output", "grad x", "grad bias", "grad residual", "grad ln weight", "grad ln bias")
EPS = 1e-12


def make_inputs(rows: int, hidden: int, dtype=torch.float32, lead=()):
    shape = (*lead, rows, hidden)
    x, residual = torch.randn(shape), torch.randn(shape) * 2
    bias, ln_weight, ln_bias = torch.randn(hidden), 1 + 0.2 * torch.randn(hidden), 0.1 * torch.randn(hidden)
    return [t.to(dtype) for t in (x, bias, residual, ln_weight, ln_bias)]


def run(fn, inputs, grad, dropout_p=0.0, training=False):
    """(output, grad x, grad bias, grad residual, grad ln weight, grad ln bias)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    y = fn(*inputs, EPS, dropout_p, training)
    return (y.detach(), *torch.autograd.grad(y, inputs, grad))


def check(inputs):
    x = inputs[0]
    grad = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    actual = run(kernel.bias_dropout_add_layernorm, inputs, grad)
    ref32 = run(reference.bias_dropout_add_layernorm, [t.float() for t in inputs], grad.float())
    ref_same = run(reference.bias_dropout_add_layernorm, inputs, grad)
    assert_matches_reference(NAMES, actual, ref32, ref_same)


@pytest.mark.parametrize(
    "rows,hidden", [(1, 8), (3, 384), (127, 768), (3, 1000), (1, 1024), (127, 1024), (2, 4096)]
)
def test_fp32_matches_reference(rows, hidden):
    check(make_inputs(rows, hidden))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("rows,hidden", [(1, 8), (3, 1000), (127, 768)])
def test_half_precision_relative_rule(rows, hidden, dtype):
    check(make_inputs(rows, hidden, DTYPES[dtype]))


@pytest.mark.parametrize("rows,hidden", [(3, 384), (127, 768)])
def test_autocast_mix_of_bf16_activation_and_fp32_parameters(rows, hidden):
    # Under autocast the dense output is bf16 while bias, residual and LayerNorm stay fp32: fp32 out.
    x, *rest = make_inputs(rows, hidden)
    check([x.bfloat16(), *rest])


def test_extra_leading_dims_and_zero_rows():
    check(make_inputs(3, 40, lead=(2,)))
    out, dx, dbias, dres, dw, db = run(kernel.bias_dropout_add_layernorm, make_inputs(0, 32), torch.zeros(0, 32))
    assert out.shape == dx.shape == dres.shape == (0, 32)
    for g in (dbias, dw, db):
        assert torch.equal(g, torch.zeros(32))


def test_eval_mode_ignores_dropout_p():
    inputs = make_inputs(5, 64)
    grad = torch.randn(5, 64)
    actual = run(kernel.bias_dropout_add_layernorm, inputs, grad, dropout_p=0.5, training=False)
    expected = run(reference.bias_dropout_add_layernorm, inputs, grad, dropout_p=0.5, training=False)
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _dropped(p: float, rows: int = 64, hidden: int = 384, seed: int = 1):
    torch.manual_seed(seed)
    inputs = make_inputs(rows, hidden)
    grad = torch.randn(rows, hidden)
    torch.manual_seed(seed + 100)
    return inputs, grad, run(kernel.bias_dropout_add_layernorm, inputs, grad, dropout_p=p, training=True)


def test_dropout_is_reproducible_from_the_seed():
    _, _, first = _dropped(0.3, rows=16)
    _, _, again = _dropped(0.3, rows=16)
    _, _, other = _dropped(0.3, rows=16, seed=2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p_and_backward_uses_the_forward_mask(p):
    inputs, grad, (out, dx, dbias, dres, dw, db) = _dropped(p)
    keep = dx != 0  # x reaches the output exactly where the mask kept it
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
    # The same mask explains the forward output and every gradient.
    x, bias, residual, ln_weight, ln_bias = inputs

    def masked(x, bias, residual, ln_weight, ln_bias, eps, dropout_p, training):
        h = torch.where(keep, (x + bias) / (1 - p), 0.0) + residual
        return torch.nn.functional.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)

    expected = run(masked, inputs, grad)
    for name, a, e in zip(NAMES, (out, dx, dbias, dres, dw, db), expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(e.abs().max().item(), 1.0),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_dropout_p_one_drops_everything():
    inputs, grad, (out, dx, dbias, *_) = _dropped(1.0, rows=4, hidden=32)
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dbias, torch.zeros_like(dbias))
    _, _, residual, ln_weight, ln_bias = inputs
    expected = torch.nn.functional.layer_norm(residual, (32,), ln_weight, ln_bias, EPS)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rejects_invalid_dropout_probability():
    with pytest.raises(ValueError, match="dropout probability"):
        run(ops.bias_dropout_add_layernorm, make_inputs(2, 8), torch.zeros(2, 8), dropout_p=1.5)


def test_ops_routes_to_the_kernel_under_the_triton_backend():
    inputs = [t.requires_grad_() for t in make_inputs(3, 64)]
    with ops.use_backend("triton"):
        backend, fn = ops.implementation("bias_dropout_add_layernorm", inputs[0])
        y = ops.bias_dropout_add_layernorm(*inputs, EPS, 0.0, False)
    assert backend == "triton" and fn is kernel.bias_dropout_add_layernorm
    assert "bertfast_bias_dropout_add_layernorm_triton" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, reference.bias_dropout_add_layernorm(*inputs, EPS, 0.0, False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [768, 1024])
def test_cuda_matches_reference(hidden, dtype):
    check([t.cuda() for t in make_inputs(4096, hidden, DTYPES[dtype])])


@pytest.mark.gpu
def test_cuda_dropout_mask_matches_between_forward_and_backward():
    inputs = [t.cuda().requires_grad_() for t in make_inputs(2048, 768)]
    y = kernel.bias_dropout_add_layernorm(*inputs, EPS, 0.1, True)
    dx, dres = torch.autograd.grad(y, (inputs[0], inputs[2]), torch.randn_like(y))
    keep = dx != 0
    torch.testing.assert_close(dx[keep], dres[keep] / 0.9)
    assert abs(keep.float().mean().item() - 0.9) < 0.01

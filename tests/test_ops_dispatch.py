"""The op layer: backend choice, forcing, and the native CPU kernels against the references."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_relative_rule

from bertfast import ops
from bertfast.ops import dispatch, reference
from bertfast.padding import Packing


def test_cpu_uses_native_where_it_exists_and_the_reference_elsewhere():
    x = torch.randn(3, 8)
    backend, _ = ops.implementation("bias_gelu", x)
    assert backend == "native"
    with ops.use_backend("torch"):
        assert ops.implementation("bias_gelu", x) == ("torch", reference.bias_gelu)


def test_environment_variable_forces_a_backend_and_is_read_once(monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", "torch")
    assert ops.implementation("bias_gelu", torch.randn(2, 2))[0] == "native"  # read at import, not per call
    try:
        dispatch.read_environment()
        assert ops.implementation("bias_gelu", torch.randn(2, 2))[0] == "torch"
        monkeypatch.setenv("BERTFAST_BACKEND", "cuda-please")
        with pytest.raises(ValueError, match="unknown bertfast backend 'cuda-please'"):
            dispatch.read_environment()
    finally:
        monkeypatch.delenv("BERTFAST_BACKEND")
        dispatch.read_environment()


@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 384), (127, 1000), (300, 768)])
def test_native_bias_gelu_matches_reference_with_gradients(rows, hidden):
    """Against float64: the native kernel's error is within 2x PyTorch's own float32 error (+1e-6)."""
    x = (3 * torch.randn(rows, hidden)).requires_grad_()
    b = torch.randn(hidden, requires_grad=True)
    dy = torch.randn(rows, hidden)
    assert ops.implementation("bias_gelu", x)[0] == "native"
    y = ops.bias_gelu(x, b)
    grads = torch.autograd.grad(y, (x, b), dy)
    y32 = reference.bias_gelu(x, b)
    grads32 = torch.autograd.grad(y32, (x, b), dy)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = reference.bias_gelu(x64, b64)
    grads64 = torch.autograd.grad(y64, (x64, b64), dy.double())
    assert_relative_rule(y, y64, y32, atol=1e-6, name="y")
    for name, g, g32, g64 in zip(("dx", "dbias"), grads, grads32, grads64, strict=True):
        assert_relative_rule(g, g64, g32, atol=1e-6, name=name)


def test_native_bias_gelu_falls_back_for_other_dtypes():
    x = torch.randn(4, 8, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    assert torch.equal(ops.bias_gelu(x, b), reference.bias_gelu(x, b))


def test_reference_attention_equals_per_sequence_attention():
    lengths = [1, 7, 0, 5]
    total = sum(lengths)
    qkv = torch.randn(total, 3, 2, 8)
    cu = torch.tensor([0, 1, 8, 8, 13], dtype=torch.int32)
    out = reference.attention(qkv, cu, max(lengths))
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q, k, v = qkv[start:end].permute(1, 2, 0, 3)  # (heads, len, dim) each
        expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        torch.testing.assert_close(out[start:end], expected.transpose(0, 1))


def test_packing_round_trip_with_holes():
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    packing = Packing.from_mask(mask)
    assert packing.cu_seqlens.tolist() == [0, 3, 3, 7] and packing.max_seqlen == 4
    x = torch.arange(12.0).view(3, 4)
    assert torch.equal(packing.unpack(packing.pack(x)), x * mask)

"""The op layer: backend choice, forcing, and the native CPU kernels against the references."""

from __future__ import annotations

import pytest
import torch

from bertfast import ops
from bertfast.ops import reference
from bertfast.padding import Packing


def test_cpu_uses_native_where_it_exists_and_the_reference_elsewhere():
    x = torch.randn(3, 8)
    backend, _ = ops.implementation("bias_gelu", x)
    assert backend == "native"
    with ops.use_backend("torch"):
        assert ops.implementation("bias_gelu", x) == ("torch", reference.bias_gelu)


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", "torch")
    assert ops.implementation("bias_gelu", torch.randn(2, 2))[0] == "torch"
    monkeypatch.setenv("BERTFAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="unknown bertfast backend 'cuda-please'"):
        ops.implementation("bias_gelu", torch.randn(2, 2))


@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 384), (127, 1000)])
def test_native_bias_gelu_matches_reference_with_gradients(rows, hidden):
    x = torch.randn(rows, hidden, requires_grad=True)
    b = torch.randn(hidden, requires_grad=True)
    dy = torch.randn(rows, hidden)
    y = ops.bias_gelu(x, b)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    y_ref = reference.bias_gelu(x, b)
    dx_ref, db_ref = torch.autograd.grad(y_ref, (x, b), dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, db_ref, rtol=1e-5, atol=1e-5)


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

"""The op layer: backend choice, forcing, and the native CPU kernels against the references."""

from __future__ import annotations

import contextlib

import pytest
import torch
from numerics import assert_relative_rule
from torch._subclasses.fake_tensor import FakeTensorMode

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


def op_inputs(dtype, device):
    """A small call of every op: {op: (the tensors the dispatcher decides on, a call of the public op)}.

    Without dropout: a fake CUDA tensor has no generator to draw a seed from on a build without CUDA.
    """
    x = torch.randn(6, 16, dtype=dtype, device=device, requires_grad=True)
    vec = torch.randn(16, dtype=dtype, device=device)
    qkv = torch.randn(6, 3, 2, 8, dtype=dtype, device=device, requires_grad=True)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    ids = torch.tensor([1, 2, 0, 3, 1, 2], device=device)
    weight = torch.randn(5, 16, dtype=dtype, device=device)
    labels = torch.tensor([0, 4, -100, 1, 2, 3], device=device)
    tables = (torch.randn(5, 16, dtype=dtype, device=device, requires_grad=True), torch.randn(8, 16, dtype=dtype,
              device=device), torch.randn(2, 16, dtype=dtype, device=device))
    return {
        "embeddings": ((*tables, vec, vec), lambda: ops.embeddings(ids, ids, ids % 2, *tables, vec, vec, 1e-5, 0.0,
                                                                   False)),
        "bias_gelu": ((x, vec), lambda: ops.bias_gelu(x, vec)),
        "bias_dropout_add_layernorm": ((x, vec, x, vec, vec), lambda: ops.bias_dropout_add_layernorm(
            x, vec, x, vec, vec, 1e-5, 0.0, False)),
        "bias_gelu_layernorm": ((x, vec, vec, vec), lambda: ops.bias_gelu_layernorm(x, vec, vec, vec, 1e-5)),
        "attention": ((qkv,), lambda: ops.attention(qkv, cu, 4)),
        "linear_cross_entropy": ((x, weight, None), lambda: ops.linear_cross_entropy(x, weight, None, labels)[0]),
    }


# What runs where, unforced: CPU float32 and bfloat16 have native kernels (the MLM loss's chunked version
# takes every float dtype but float64); CUDA has Triton for everything but fp32 attention; float64 is the
# reference's.
EXPECTED = {
    ("cpu", torch.float32): {"bias_gelu_layernorm": "torch", "*": "native"},
    ("cpu", torch.float16): {"linear_cross_entropy": "native", "*": "torch"},
    ("cpu", torch.bfloat16): {"bias_gelu_layernorm": "torch", "*": "native"},
    ("cpu", torch.float64): {"*": "torch"},
    ("cuda", torch.float32): {"attention": "torch", "*": "triton"},
    ("cuda", torch.float16): {"*": "triton"},
    ("cuda", torch.bfloat16): {"*": "triton"},
    ("cuda", torch.float64): {"*": "torch"},
}


@pytest.mark.parametrize("device,dtype", list(EXPECTED), ids=[f"{d}-{str(t)[6:]}" for d, t in EXPECTED])
def test_implementation_reports_the_backend_that_runs(device, dtype):
    """Each op's reported backend for these inputs; on CPU also the op that the call then records.

    CUDA inputs are fake tensors (no GPU needed). A custom op cannot even be called with them on a
    build without CUDA, so for those only the report is checked.
    """
    pytest.importorskip("triton")
    with FakeTensorMode() if device == "cuda" else contextlib.nullcontext():
        calls = op_inputs(dtype, device)
        for op, (tensors, call) in calls.items():
            expected = EXPECTED[device, dtype].get(op, EXPECTED[device, dtype]["*"])
            backend, _ = ops.implementation(op, *tensors)
            assert backend == expected, (op, backend)
            if device == "cpu":
                grad_fn = call().grad_fn
                recorded = f"{type(grad_fn).__name__} {grad_fn.name()}"
                if expected == "torch":
                    assert "bertfast" not in recorded, (op, recorded)
                elif op in ("bias_gelu", "linear_cross_entropy"):  # the others end in a reference op
                    assert "bertfast::(anonymous namespace)::BiasGelu" in recorded or (
                        "linear_cross_entropy_chunked" in recorded), (op, recorded)


def test_a_forced_backend_that_does_not_take_the_inputs_runs_the_reference():
    x = torch.randn(4, 8, dtype=torch.float64)
    with ops.use_backend("native"):
        assert ops.implementation("bias_gelu", x)[0] == "torch"
        assert ops.implementation("bias_gelu", x.float(), approximate="tanh")[0] == "torch"
        assert ops.implementation("bias_gelu", x.float())[0] == "native"
    assert ops.forced_backend() is None

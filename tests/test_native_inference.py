"""The native CPU inference kernels (packed attention, bias + residual + LayerNorm, bias + GELU) against
the references, the cases they must refuse, and which path the model's eval forward takes."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_relative_rule

from bertfast import modules, ops, prepacked
from bertfast.config import BertConfig
from bertfast.models import BertModel
from bertfast.ops import native, reference


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def per_sequence_attention(qkv: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """float64 attention of each sequence on its own, (T, heads, head_dim)."""
    qkv = qkv.double()
    outputs, start = [], 0
    for n in lengths:
        q, k, v = qkv[start:start + n].permute(1, 2, 0, 3)  # (heads, n, head_dim) each
        outputs.append((torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(qkv.shape[-1]), -1) @ v).transpose(0, 1))
        start += n
    return torch.cat(outputs)


@pytest.mark.parametrize("lengths,heads,head_dim", [
    ([1, 7, 0, 33], 2, 32), ([24], 12, 32), ([0, 5, 0], 3, 64), ([128, 1, 17], 4, 64), ([9], 1, 20), ([0], 2, 32),
])
def test_packed_attention_matches_the_reference(lengths, heads, head_dim):
    torch.manual_seed(0)
    qkv = 2 * torch.randn(sum(lengths), 3, heads, head_dim)
    cu = cu_of(lengths)
    max_seqlen = max(lengths) + 5  # only an upper bound
    with torch.inference_mode():
        assert native.inference_call(0.1, False, qkv)
        out = ops.attention(qkv, cu, max_seqlen)
        ref32 = reference.attention(qkv, cu, max_seqlen)
    assert out.shape == (sum(lengths), heads, head_dim)
    assert_relative_rule(out, per_sequence_attention(qkv, lengths), ref32, atol=1e-6)


def test_packed_attention_refuses_inconsistent_offsets():
    qkv = torch.randn(6, 3, 2, 8)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="longer than max_seqlen 3"):
            ops.attention(qkv, cu_of([2, 4]), 3)
        with pytest.raises(ValueError, match="end at the token count 6, got 0 and 5"):
            ops.attention(qkv, cu_of([2, 3]), 8)
        with pytest.raises(ValueError, match="nondecreasing"):
            ops.attention(qkv, torch.tensor([0, 4, 2, 6], dtype=torch.int32), 8)


@pytest.mark.parametrize("rows,hidden", [(1, 384), (7, 1000), (0, 384), (33, 17)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_layernorm_matches_the_reference(rows, hidden, with_bias):
    torch.manual_seed(0)
    x, residual = torch.randn(rows, hidden), 3 * torch.randn(rows, hidden) + 1
    bias = torch.randn(hidden) if with_bias else None
    weight, shift = torch.randn(hidden), torch.randn(hidden)

    def run(dtype):
        cast = [None if t is None else t.to(dtype) for t in (x, bias, residual, weight, shift)]
        return reference.bias_dropout_add_layernorm(*cast, 1e-12, 0.1, False)

    with torch.inference_mode():
        out = ops.bias_dropout_add_layernorm(x, bias, residual, weight, shift, 1e-12, 0.1, False)
    assert_relative_rule(out, run(torch.float64), run(torch.float32), atol=1e-6)


def test_the_inference_kernels_take_only_calls_without_gradient_or_dropout():
    qkv = torch.randn(5, 3, 2, 8, requires_grad=True)
    assert not native.inference_call(0.0, False, qkv)  # recorded for backward
    with torch.no_grad():
        assert native.inference_call(0.0, True, qkv) and native.inference_call(0.1, False, qkv)
        assert not native.inference_call(0.1, True, qkv)  # dropout
    # A training call still differentiates (through the reference path) on the native backend.
    out = ops.attention(qkv, cu_of([2, 3]), 3)
    out.sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_in_inference_is_the_native_kernel(with_bias):
    x, bias = 3 * torch.randn(24, 1536), torch.randn(1536) if with_bias else None
    with torch.inference_mode():
        assert ops.implementation("bias_gelu", x, bias)[0] == "native"
        out = ops.bias_gelu(x, bias)
    x64 = x.double() if bias is None else x.double() + bias.double()
    assert_relative_rule(out, torch.nn.functional.gelu(x64), reference.bias_gelu(x, bias), atol=1e-6)


@pytest.mark.parametrize("one_call", [True, False])
def test_eval_forward_runs_the_fused_kernels_and_equals_the_torch_backend(one_call):
    """In eval each layer is one native call (bertfast::encoder_layer on prepacked weights); where that call is
    off, every layer's attention, both add+LayerNorm blocks and bias+GELU run native kernels."""
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_preset("tiny")).eval()
    ids = torch.randint(5, 100, (3, 11))
    mask = torch.tensor([[1] * 11, [1] * 4 + [0] * 7, [0] * 11])
    called: list[str] = []
    kernels = {name: getattr(native, name) for name in ("_attention_op", "_add_layernorm_op", "_bias_gelu_op")}
    one_layer = prepacked.encoder_layer

    def spy(name, fn):
        def run(*args):
            called.append(name)
            return fn(*args)
        return run

    with pytest.MonkeyPatch.context() as patch, torch.inference_mode():
        for name in kernels:
            patch.setattr(native, name, spy(name, kernels[name]))
        patch.setattr(prepacked, "encoder_layer", spy("encoder_layer", one_layer))
        if not one_call:
            patch.setattr(modules, "prepacked_layer", lambda *args, **kwargs: None)
        fast = model(ids, attention_mask=mask).last_hidden_state
    layers = model.config.num_hidden_layers
    if one_call:
        assert called == ["encoder_layer"] * layers
    else:
        assert sorted(called) == sorted(["_attention_op"] * layers + ["_add_layernorm_op"] * 2 * layers
                                        + ["_bias_gelu_op"] * layers)
    with torch.inference_mode(), ops.use_backend("torch"):
        slow = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_inference_ops_pass_opcheck():
    qkv = torch.randn(5, 3, 2, 16)
    x, residual, vec = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    for op, args in [
        (native._attention_op, (qkv, cu_of([2, 0, 3]), 4, 0.25)),
        (native._add_layernorm_op, (x, vec, residual, vec, vec, 1e-5)),
        (native._add_layernorm_op, (x, None, residual, vec, vec, 1e-5)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

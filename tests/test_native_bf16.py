"""The native CPU ops on bfloat16 tensors (float32 arithmetic, bf16 loads and stores) against the reference:
in bf16 within tests/numerics.py's relative rule of the float32 reference, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.common import dropout as policy
from bertfast.config import BertConfig
from bertfast.models import BertModel
from bertfast.ops import native, reference

BF16 = torch.bfloat16


def bf16(*shape, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape)).to(BF16)


def f32(*tensors):
    return [None if t is None else t.float() for t in tensors]


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("rows,hidden", [(1, 8), (7, 384), (33, 1000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_with_gradients(rows, hidden, with_bias):
    torch.manual_seed(0)
    x, b, dy = bf16(rows, hidden, scale=3.0), bf16(hidden) if with_bias else None, bf16(rows, hidden)
    assert ops.implementation("bias_gelu", x, b)[0] == "native"

    def run(fn, *inputs):
        inputs = leaves(*inputs)
        y = fn(*inputs)
        grads = torch.autograd.grad(y, [t for t in inputs if t is not None], dy.to(y.dtype))
        return (y, *grads)

    names = ("y", "dx", "dbias")[: 3 if with_bias else 2]
    assert_matches_reference(names, run(ops.bias_gelu, x, b), run(reference.bias_gelu, *f32(x, b)),
                             run(reference.bias_gelu, x, b))


@pytest.mark.parametrize("lengths,heads,head_dim", [([1, 7, 0, 33], 2, 32), ([24], 12, 32), ([128, 5], 4, 64)])
def test_attention_in_inference(lengths, heads, head_dim):
    torch.manual_seed(0)
    qkv = bf16(sum(lengths), 3, heads, head_dim, scale=2.0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.inference_mode():
        assert ops.implementation("attention", qkv)[0] == "native"
        out = ops.attention(qkv, cu, max(lengths))
        assert_matches_reference(("out",), (out,), (reference.attention(qkv.float(), cu, max(lengths)),),
                                 (reference.attention(qkv, cu, max(lengths)),))


@pytest.mark.parametrize("with_bias", [True, False])
def test_add_layernorm_in_inference(with_bias):
    torch.manual_seed(0)
    x, residual = bf16(9, 384), bf16(9, 384, scale=3.0) + 1
    bias = bf16(384) if with_bias else None
    weight, shift = bf16(384), bf16(384)
    with torch.inference_mode():
        out = ops.bias_dropout_add_layernorm(x, bias, residual, weight, shift, 1e-12, 0.1, False)
        args = (x, bias, residual, weight, shift, 1e-12, 0.1, False)
        assert_matches_reference(("y",), (out,), (reference.bias_dropout_add_layernorm(*f32(*args[:5]), *args[5:]),),
                                 (reference.bias_dropout_add_layernorm(*args),))


def test_dropout_keeps_the_shared_mask_and_rounds_once():
    x = bf16(37, 300, scale=4.0).requires_grad_()
    seed = torch.tensor(11)
    y = native.dropout(x, 0.3, True, seed=seed)
    keep = policy.keep_mask(seed, torch.arange(37), 300, 0.3)
    assert y.dtype == BF16
    # Computed in float32 and rounded once: x * (1 / 0.7) in float, then to bf16.
    torch.testing.assert_close(y, torch.where(keep, x.float() * (1 / 0.7), 0.0).to(BF16), rtol=0, atol=0)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(dx, torch.where(keep, torch.tensor(1 / 0.7), 0.0).to(BF16), rtol=0, atol=0)


def test_bf16_eval_forward_runs_native_and_matches_the_reference():
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_preset("tiny")).eval()
    ids = torch.randint(5, 100, (3, 11))
    mask = torch.tensor([[1] * 11, [1] * 4 + [0] * 7, [1] * 2 + [0] * 9])
    with torch.inference_mode(), ops.use_backend("torch"):
        exact = model(ids, attention_mask=mask).last_hidden_state
    model.to(BF16)
    with torch.inference_mode():
        fast = model(ids, attention_mask=mask).last_hidden_state
        with ops.use_backend("torch"):
            slow = model(ids, attention_mask=mask).last_hidden_state
    assert fast.dtype == BF16
    assert_matches_reference(("last_hidden_state",), (fast,), (exact,), (slow,))

"""``torch.library.opcheck`` on every bertfast custom op: schema, autograd registration, fake (meta)
implementation and AOT dispatch with dynamic shapes. The Triton ops run in the interpreter (conftest).

All but ``bertfast::linear`` and ``bertfast::encoder_layer``: their weights are opaque oneDNN tensors, which opcheck
cannot inspect (no storage); tests/test_prepacked.py checks them against PyTorch."""

from __future__ import annotations

import pytest
import torch

from bertfast.ops import chunked_cross_entropy, native

pytest.importorskip("triton")

from bertfast.kernels import (  # noqa: E402
    attention,
    bias_dropout_add_layernorm,
    bias_gelu,
    bias_gelu_layernorm,
    cross_entropy,
    embeddings,
)

ROWS, HIDDEN = 5, 16


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def seed():
    return torch.tensor(1234)


def row_stats(x):
    rows = x.numel() // x.shape[-1]
    return torch.randn(rows), torch.rand(rows) + 0.5


def cases():
    x, bias, res, w, b = leaf(ROWS, HIDDEN), leaf(HIDDEN), leaf(ROWS, HIDDEN), leaf(HIDDEN), leaf(HIDDEN)
    dy = torch.randn(ROWS, HIDDEN)
    mean, rstd = row_stats(x)
    plain = [t.detach() for t in (x, bias, res, w)]
    ids, pos, types = torch.tensor([1, 0, 3, 3, 2]), torch.arange(ROWS), torch.tensor([0, 1, 0, 0, 1])
    tables = [leaf(7, HIDDEN), leaf(8, HIDDEN), leaf(2, HIDDEN)]
    lengths = [2, 0, 3]
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    qkv = leaf(sum(lengths), 3, 2, 16)
    out, lse = torch.randn(5, 2, 16), torch.randn(2, 5)
    weight, labels = leaf(11, HIDDEN), torch.tensor([1, -100, 10, 0, 3])
    found = {
        "bias_gelu": (native._bias_gelu_op, (x, bias)),
        "bias_gelu(bias=None)": (native._bias_gelu_op, (x, None)),
        "bias_gelu(bf16)": (native._bias_gelu_op, (leaf(ROWS, HIDDEN, dtype=torch.bfloat16), bias)),
        "bias_gelu_backward": (native._bias_gelu_backward_op, (dy, *plain[:2])),
        "bias_gelu_backward(bf16, bias=None)": (
            native._bias_gelu_backward_op, (dy.bfloat16(), plain[0].bfloat16(), None)),
        "dropout": (native._dropout_op, (x, seed(), 0.3, None)),
        "dropout(rows)": (native._dropout_op, (x, seed(), 0.3, torch.tensor([4, 9, 0, 2**31, 7]))),
        "dropout(bf16)": (native._dropout_op, (leaf(ROWS, HIDDEN, dtype=torch.bfloat16), seed(), 0.5, None)),
        "dropout_bits": (native._dropout_bits_op, (seed(), torch.tensor([3, 0, 2**40]), 7)),
        "attention": (native._attention_op, (qkv, cu, 4, 0.25)),
        "attention(inference)": (native._attention_op, (qkv.detach(), cu, 4, 0.25)),
        "attention(bf16)": (native._attention_op, (leaf(5, 3, 2, 16, dtype=torch.bfloat16), cu, 3, 0.25)),
        "attention(bias, dropout)": (native._attention_op, (qkv, cu, 4, 0.25, leaf(2, 7), seed(), 0.2)),
        "attention(bf16, dropout)": (
            native._attention_op, (qkv.detach().bfloat16().requires_grad_(), cu, 3, 0.25, None, seed(), 0.5)),
        "attention(window, dropout)": (native._attention_op, (qkv, cu, 4, 0.25, None, seed(), 0.2, 1)),
        "attention(columns, bias, window)": (
            native._attention_op, (qkv, cu, 6, 0.25, leaf(2, 11), seed(), 0.2, 1, torch.tensor([0, 3, 1, 2, 5]))),
        "attention(window, inference)": (native._attention_op, (qkv.detach(), cu, 4, 0.25, None, None, 0.0, 0)),
        "attention(disentangled, dropout)": (native._attention_op, (
            qkv, cu, 4, 0.25, None, seed(), 0.2, None, None, leaf(6, 2, 16), leaf(6, 2, 16),
            torch.tensor([0, 1, 2, 3, 4, 5, 5]))),
        "attention(disentangled c2p, inference)": (native._attention_op, (
            qkv.detach(), cu, 4, 0.25, None, None, 0.0, None, None, torch.randn(6, 2, 16), None,
            torch.tensor([5, 4, 3, 3, 2, 1, 0]))),
        "attention_forward": (
            native._attention_forward_op, (qkv.detach(), cu, 4, 0.25, torch.randn(2, 7), seed(), 0.2)),
        "attention_backward": (native._attention_backward_op, (
            torch.randn(5, 2, 16), qkv.detach(), torch.randn(5, 2), cu, 4, 0.25,
            torch.randn(2, 7), seed(), 0.2, 2)),
        "attention_backward(disentangled)": (native._attention_backward_op, (
            torch.randn(5, 2, 16), qkv.detach(), torch.randn(5, 2), cu, 4, 0.25, None, None, 0.0, None, None,
            torch.randn(6, 2, 16), torch.randn(6, 2, 16), torch.tensor([0, 1, 2, 3, 4, 5, 5]))),
        "rotary": (native._rotary_op, (qkv, torch.tensor([0, 7, 1, 300, 2]), torch.rand(8))),
        "rotary(bf16, inverse)": (
            native._rotary_op, (qkv.detach().bfloat16().requires_grad_(), torch.arange(5), torch.rand(8), True)),
        "geglu": (native._geglu_op, (leaf(ROWS, 2 * HIDDEN),)),
        "geglu(bf16, 3-D)": (native._geglu_op, (leaf(2, 3, 2 * HIDDEN, dtype=torch.bfloat16),)),
        "geglu_backward": (native._geglu_backward_op, (dy, torch.randn(ROWS, 2 * HIDDEN))),
        # Forward-only (inference) op: no autograd, so its inputs need no gradient.
        "add_layernorm": (native._add_layernorm_op, (*plain[:3], w.detach(), b.detach(), 1e-5)),
        "add_layernorm(bf16, bias=None)": (
            native._add_layernorm_op, (plain[0].bfloat16(), None, plain[2].bfloat16(), w.detach(), b.detach(), 1e-5)),
        "bias_gelu_triton": (bias_gelu._forward_op, (x, bias, "none")),
        "bias_gelu_triton(bias=None,tanh)": (bias_gelu._forward_op, (x, None, "tanh")),
        "bias_gelu_triton_backward": (bias_gelu._backward_op, (dy, *plain[:2], "none")),
        "bias_dropout_add_layernorm_triton": (
            bias_dropout_add_layernorm._forward_op, (x, bias, res, w, b, seed(), 1e-5, 0.2)),
        "bias_dropout_add_layernorm_triton(eval)": (
            bias_dropout_add_layernorm._forward_op, (x, None, res, w, b, None, 1e-5, 0.0)),
        "bias_dropout_add_layernorm_triton_backward": (
            bias_dropout_add_layernorm._backward_op, (dy, *plain, mean, rstd, seed(), 0.2)),
        "bias_gelu_layernorm_triton": (bias_gelu_layernorm._forward_op, (x, bias, w, b, 1e-5, "none")),
        "bias_gelu_layernorm_triton_backward": (
            bias_gelu_layernorm._backward_op, (dy, plain[0], plain[1], plain[3], mean, rstd, "none")),
        "embeddings_triton": (embeddings._forward_op, (ids, pos, types, *tables, w, b, seed(), 1e-5, 0.1, 0)),
        "embeddings_triton(inputs_embeds)": (
            embeddings._forward_op, (None, pos, types, x, *tables[1:], w, b, None, 1e-5, 0.0, -1)),
        "embeddings_triton_backward": (
            embeddings._backward_op, (dy, ids, pos, types, *[t.detach() for t in tables], plain[3], mean, rstd,
                                      seed(), 0.1, 0, [True, True, False])),
        "attention_triton": (attention._forward_op, (qkv, cu, seed(), None, 4, 0.1, 0.25, True)),
        "attention_triton(no dropout)": (attention._forward_op, (qkv, cu, None, None, 3, 0.0, 0.25, True)),
        "attention_triton(bias)": (attention._forward_op, (qkv, cu, seed(), leaf(2, 7), 4, 0.1, 0.25, True)),
        "attention_triton_backward": (
            attention._backward_op,
            (torch.randn(5, 2, 16), qkv.detach(), out, lse, cu, None, None, 3, 0.0, 0.25, True)),
        "attention_triton_backward(bias)": (
            attention._backward_op,
            (torch.randn(5, 2, 16), qkv.detach(), out, lse, cu, None, torch.randn(2, 5), 3, 0.0, 0.25, True)),
    }
    ce_args = (x, weight, leaf(11), labels, -100, 0.1)
    ce_backward_args = ([t.detach() for t in ce_args[:3]], labels, torch.rand(ROWS), -100, 0.1, 64, [True] * 3)
    for fn in (cross_entropy.linear_cross_entropy, chunked_cross_entropy.linear_cross_entropy):
        name = fn.forward_op._name
        found[name] = (fn.forward_op, (*ce_args, "mean", None, [True, True, True]))
        found[f"{name}(none, no bias)"] = (fn.forward_op, (x, weight, None, labels, -100, 0.0, "none", 64,
                                                            [True, True, False]))
        found[f"{name}_backward"] = (fn.backward_op, (*ce_backward_args[0], *ce_backward_args[1:]))
    return found


@pytest.mark.parametrize("name", list(cases()))
def test_opcheck(name, one_thread):
    op, args = cases()[name]
    torch.library.opcheck(op, args)

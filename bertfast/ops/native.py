"""Ops backed by the C++ CPU kernels in ``bertfast._C``.

The kernels take contiguous float32 buffers; anything else (other dtypes, the
tanh GELU) runs the reference instead.

Dropout here keeps no mask: element i of a tensor is kept when a counter-based hash of
(seed, i) clears the threshold (``csrc/dropout.cpp``), so backward regenerates the mask
from the seed, and drawing it costs a fraction of ``torch.bernoulli_``'s time (the largest
single cost of a small model's training step on a CPU). The seed comes from torch's
default generator: ``torch.manual_seed`` makes runs repeat.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bertfast import _C
from bertfast.ops import reference


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor) -> Tensor:
        x2d = x.detach().reshape(-1, x.shape[-1]).contiguous()
        b = bias.detach().contiguous()
        ctx.save_for_backward(x2d, b)
        ctx.input_shape = x.shape
        y = _C.bias_gelu_forward(x2d.numpy(), b.numpy())
        return torch.from_numpy(y).view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor]:
        x2d, b = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx, db = _C.bias_gelu_backward(dy2d.numpy(), x2d.numpy(), b.numpy())
        return torch.from_numpy(dx).view(ctx.input_shape), torch.from_numpy(db)


def _native(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x + bias) with the native kernel for float32 CPU tensors and the exact GELU."""
    if approximate != "none" or not _native(x, bias):
        return reference.bias_gelu(x, bias, approximate)
    return _BiasGelu.apply(x, bias)


def _apply_mask(x: Tensor, p: float, seed: int) -> Tensor:
    threshold = min(round(p * 2**32), 2**32)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    y = _C.dropout(x.detach().contiguous().numpy(), seed, threshold, scale)
    return torch.from_numpy(y).view(x.shape)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float, seed: int) -> Tensor:
        ctx.p, ctx.seed = p, seed
        return _apply_mask(x, p, seed)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:
        return _apply_mask(dy, ctx.p, ctx.seed), None, None


def draw_seed() -> int:
    """A 63-bit dropout seed from torch's default generator."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def dropout(x: Tensor, p: float, training: bool, seed: int | None = None) -> Tensor:
    """``F.dropout(x, p, training)`` with the counter-based mask for float32 CPU tensors."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if not _native(x):
        return F.dropout(x, p, training)
    return _Dropout.apply(x, p, draw_seed() if seed is None else seed)


def embeddings(
    input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor, word_weight: Tensor,
    position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
    dropout_p: float, training: bool, inputs_embeds: Tensor | None = None, padding_idx: int | None = None,
) -> Tensor:
    """The reference embeddings, with the native dropout."""
    x = reference.embeddings(input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight,
                             ln_weight, ln_bias, eps, 0.0, False, inputs_embeds=inputs_embeds,
                             padding_idx=padding_idx)
    return dropout(x, dropout_p, training)


def bias_dropout_add_layernorm(
    x: Tensor, bias: Tensor, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    eps: float, dropout_p: float, training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual), with the native dropout."""
    h = dropout(x + bias, dropout_p, training) + residual
    return F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)


def attention(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None,
) -> Tensor:
    """The reference attention; in training with dropout, softmax(QK^T) V with the native dropout on P.

    SDPA on a CPU draws attention dropout with bernoulli_ over every (query, key) pair; this
    computes the same math path explicitly around the native dropout.
    """
    total = qkv.shape[0]
    if not (training and dropout_p > 0.0) or not _native(qkv) or total == 0 or cu_seqlens.numel() <= 1:
        return reference.attention(qkv, cu_seqlens, max_seqlen, dropout_p, training, softmax_scale)
    view = reference.PaddedHeads(qkv, cu_seqlens, max_seqlen)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(qkv.shape[-1])
    scores = (view.q @ view.k.transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(~view.key_mask[:, None, None, :], float("-inf"))
    probs = dropout(scores.softmax(dim=-1), dropout_p, training)
    return view.pack(probs @ view.v)

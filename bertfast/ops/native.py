"""The CPU backend: ops backed by the C++ kernels in ``bertfast._C``, registered as ``bertfast::`` ops
for the CPU dispatch key.

The kernels take contiguous float32 buffers (the dispatcher sends nothing else here). Two kernels:

* ``bertfast::native_bias_gelu`` (+ its backward): exact-erf GELU of x + bias.
* ``bertfast::native_dropout``: dropout whose mask is never stored: element i is kept when a
  counter-based hash of (seed, i) clears the threshold (``csrc/dropout.cpp``), so backward (the same
  op on the gradient) regenerates it, and drawing it costs a fraction of ``torch.bernoulli_``'s time
  (the largest single cost of a small model's training step on a CPU). The seed follows the policy
  of ``bertfast.ops``.

Embeddings, bias + dropout + residual + LayerNorm and attention are the reference computations with
this dropout in place of ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bertfast import _C
from bertfast.ops import dropout as policy
from bertfast.ops import reference
from bertfast.ops.library import custom_op


def supports(*tensors: Tensor | None, approximate: str = "none") -> bool:
    """float32 CPU tensors (and the exact GELU)."""
    present = [t for t in tensors if t is not None]
    return approximate == "none" and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in present)


def _bias_gelu_fake(x: Tensor, bias: Tensor | None) -> Tensor:
    return torch.empty_like(x)


@custom_op("native_bias_gelu", _bias_gelu_fake, device_types="cpu")
def _bias_gelu_op(x: Tensor, bias: Tensor | None) -> Tensor:
    hidden = x.shape[-1]
    b = torch.zeros(hidden) if bias is None else bias.contiguous()
    y = _C.bias_gelu_forward(x.reshape(-1, hidden).contiguous().numpy(), b.numpy())
    return torch.from_numpy(y).view(x.shape)


def _bias_gelu_backward_fake(dy: Tensor, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[-1])


@custom_op("native_bias_gelu_backward", _bias_gelu_backward_fake, device_types="cpu")
def _bias_gelu_backward_op(dy: Tensor, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    hidden = x.shape[-1]
    b = torch.zeros(hidden) if bias is None else bias.contiguous()
    dx, db = _C.bias_gelu_backward(dy.reshape(-1, hidden).contiguous().numpy(),
                                   x.reshape(-1, hidden).contiguous().numpy(), b.numpy())
    return torch.from_numpy(dx).view(x.shape), torch.from_numpy(db)


def _bias_gelu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _bias_gelu_backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
    x, bias = ctx.saved_tensors
    dx, db = _bias_gelu_backward_op(dy, x, bias)
    return dx, db if bias is not None else None


_bias_gelu_op.register_autograd(_bias_gelu_backward, setup_context=_bias_gelu_setup)


def bias_gelu(x: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """gelu(x + bias), exact GELU, float32 CPU tensors."""
    return _bias_gelu_op(x, bias)


def _dropout_fake(x: Tensor, seed: Tensor, p: float, rows: Tensor | None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("native_dropout", _dropout_fake, device_types="cpu")
def _dropout_op(x: Tensor, seed: Tensor, p: float, rows: Tensor | None) -> Tensor:
    """Dropout of x (..., cols) with the shared keep rule (``bertfast.ops.dropout.keep_mask``): row i of
    x.reshape(-1, cols) is ``rows[i]`` (default i)."""
    n_cols = x.shape[-1]
    flat = x.reshape(-1, n_cols).contiguous()
    row_ids = torch.arange(flat.shape[0]) if rows is None else rows.contiguous()
    y = _C.dropout(flat.numpy(), row_ids.numpy(), int(seed), policy.threshold(p), policy.scale(p))
    return torch.from_numpy(y).view(x.shape)


def _dropout_setup(ctx, inputs, output) -> None:
    _, seed, ctx.p, rows = inputs
    ctx.save_for_backward(seed, rows)


def _dropout_backward(ctx, dy: Tensor) -> tuple[Tensor | None, None, None, None]:
    seed, rows = ctx.saved_tensors
    return _dropout_op(dy, seed, ctx.p, rows), None, None, None


_dropout_op.register_autograd(_dropout_backward, setup_context=_dropout_setup)


def dropout(x: Tensor, p: float, training: bool, seed: Tensor | None = None) -> Tensor:
    """``F.dropout(x, p, training)`` with the shared counter-hash mask (float32 CPU tensors)."""
    policy.check_probability(p)
    if not training or p == 0.0:
        return x
    return _dropout_op(x, policy.draw_seed(x.device) if seed is None else seed, p, None)


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
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    eps: float, dropout_p: float, training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual), with the native dropout."""
    h = dropout(x if bias is None else x + bias, dropout_p, training) + residual
    return F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)


def attention(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None,
) -> Tensor:
    """The reference attention; in training with dropout, softmax(QK^T) V with the native dropout on P.

    SDPA on a CPU draws attention dropout with bernoulli_ over every (query, key) pair; this is the
    reference's explicit path with the C++ kernel applying the (same) mask.
    """
    if not (training and dropout_p > 0.0):
        return reference.attention(qkv, cu_seqlens, max_seqlen, dropout_p, training, softmax_scale)
    seed = policy.draw_seed(qkv.device)
    return reference.attention_with_dropout(
        qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
        lambda probs, rows: _dropout_op(probs, seed, dropout_p, rows),
    )

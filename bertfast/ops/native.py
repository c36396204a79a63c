"""The CPU backend: ops backed by the C++ kernels in ``bertfast._C``, registered as ``bertfast::`` ops
for the CPU dispatch key.

The kernels take contiguous float32 buffers (the dispatcher sends nothing else here):

* ``bertfast::native_bias_gelu`` (+ its backward): exact-erf GELU of x + bias.
* ``bertfast::native_dropout``: dropout whose mask is never stored: element i is kept when a
  counter-based hash of (seed, i) clears the threshold (``csrc/dropout.cpp``), so backward (the same
  op on the gradient) regenerates it, and drawing it costs a fraction of ``torch.bernoulli_``'s time
  (the largest single cost of a small model's training step on a CPU). The seed follows the policy
  of ``bertfast.ops``.
* Inference only (forward kernels, no autograd): ``bertfast::native_attention``, attention of the
  packed sequences themselves, parallel over (sequence, head), with no padded batch
  (``csrc/attention.cpp``); ``bertfast::native_add_layernorm``, LayerNorm(x + bias + residual) in
  one pass (``csrc/add_layernorm.cpp``).

Attention and bias + dropout + residual + LayerNorm run those kernels for a call that needs no
gradient and has no dropout (:func:`inference_call`: ``eval()`` under ``no_grad`` /
``inference_mode``); training calls get the reference computations with the native dropout in place
of ``F.dropout``, as do the embeddings.

Per-call cost. A ``torch.library`` custom op costs tens of microseconds per call in eager mode,
which at batch 1 is a sizable share of a small model's forward. A call that records no autograd and
is not being compiled therefore runs the kernel function directly; under ``torch.compile`` it goes
through the custom op, which the compiler traces (:func:`_run`). Both are this backend's kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def records_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors would be recorded for backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def inference_call(dropout_p: float, training: bool, *tensors: Tensor | None) -> bool:
    """A call the forward-only kernels serve: no dropout and nothing recorded for backward."""
    return (not training or dropout_p == 0.0) and not records_autograd(*tensors)


def _run(op: torch.library.CustomOpDef, kernel: Callable[..., Tensor], *args) -> Tensor:
    """``kernel(*args)`` directly in eager mode, the custom op ``op`` (the same kernel) when compiling.

    Only for calls that record no autograd: the direct call skips the op's autograd registration.
    """
    if torch.compiler.is_compiling():
        return op(*args)
    if torch._C._autograd._profiler_enabled():  # so that a profile shows the kernel under the op's name
        with torch.profiler.record_function(f"bertfast::{op._name}"):
            return kernel(*args)
    return kernel(*args)


def _bias_gelu_fake(x: Tensor, bias: Tensor | None) -> Tensor:
    return torch.empty_like(x)


def _bias_gelu_kernel(x: Tensor, bias: Tensor | None) -> Tensor:
    hidden = x.shape[-1]
    b = torch.zeros(hidden) if bias is None else bias.contiguous()
    y = _C.bias_gelu_forward(x.reshape(-1, hidden).contiguous().numpy(), b.numpy())
    return torch.from_numpy(y).view(x.shape)


_bias_gelu_op = custom_op("native_bias_gelu", _bias_gelu_fake, device_types="cpu")(_bias_gelu_kernel)


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
    if records_autograd(x, bias):
        return _bias_gelu_op(x, bias)
    return _run(_bias_gelu_op, _bias_gelu_kernel, x, bias)


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


def _add_layernorm_fake(x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                        eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_layernorm_kernel(x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                          eps: float) -> Tensor:
    # NumPy views of any layout: the binding makes C-contiguous copies only of those that are not.
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _C.add_layernorm(x.numpy(), None if bias is None else bias.numpy(), residual.numpy(), ln_weight.numpy(),
                     ln_bias.numpy(), eps, y.numpy())
    return y


_add_layernorm_op = custom_op("native_add_layernorm", _add_layernorm_fake, device_types="cpu")(_add_layernorm_kernel)


def _attention_fake(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float) -> Tensor:
    return qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3])


def _attention_kernel(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float) -> Tensor:
    """(T, heads, head_dim) attention of packed (T, 3, heads, head_dim) ``qkv``; no gradient."""
    out = qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3])
    _C.packed_attention(qkv.numpy(), cu_seqlens.to(torch.int32).numpy(), max_seqlen, scale, out.numpy())
    return out


_attention_op = custom_op("native_attention", _attention_fake, device_types="cpu")(_attention_kernel)


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
    """LayerNorm(dropout(x + bias) + residual): one fused pass in inference, else with the native dropout."""
    if inference_call(dropout_p, training, x, bias, residual, ln_weight, ln_bias):
        return _run(_add_layernorm_op, _add_layernorm_kernel, x, bias, residual, ln_weight, ln_bias, eps)
    h = dropout(x if bias is None else x + bias, dropout_p, training) + residual
    return F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)


def attention(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None, bias_table: Tensor | None = None,
    num_buckets: int = 32, max_distance: int = 128,
) -> Tensor:
    """Inference: the packed kernel. Training: the reference attention; with dropout, softmax(QK^T) V
    with the native dropout on P.

    SDPA on a CPU draws attention dropout with bernoulli_ over every (query, key) pair; this is the
    reference's explicit path with the C++ kernel applying the (same) mask.
    """
    if bias_table is None and inference_call(dropout_p, training, qkv):
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(qkv.shape[-1])
        return _run(_attention_op, _attention_kernel, qkv, cu_seqlens, max_seqlen, scale)
    if not (training and dropout_p > 0.0):
        return reference.attention(qkv, cu_seqlens, max_seqlen, dropout_p, training, softmax_scale, bias_table,
                                   num_buckets, max_distance)
    seed = policy.draw_seed(qkv.device)
    return reference.attention_with_dropout(
        qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
        lambda probs, rows: _dropout_op(probs, seed, dropout_p, rows), bias_table, num_buckets, max_distance,
    )

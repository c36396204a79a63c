"""The masked-LM loss on the CPU: the chunked algorithm of ``bertfast.common.chunked_loss`` with torch ops
(an in-place softmax) as its softmax-cross-entropy, so that at most ``chunk_bytes`` of logits exist at once
and the gradients are computed in forward, as on the GPU. fp16/bf16 chunks also hold an fp32 work copy of
their logits, counted in ``chunk_bytes``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bertfast.common.chunked_loss import define_linear_cross_entropy
from bertfast.common.library import custom_op


def _softmax_xent_torch(
    logits: Tensor, labels: Tensor, scale: Tensor, ignore_index: int, smoothing: float,
    loss_out: Tensor, correct_out: Tensor,
) -> Tensor:
    vocab = logits.shape[1]
    z = logits if logits.dtype == torch.float32 else logits.float()  # worked on in place, in fp32
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)[:, None]
    row_max, argmax = z.max(1)  # first maximum, as torch.argmax
    correct_out.copy_((argmax == labels) & valid)
    label_logit = z.gather(1, target).squeeze(1)
    mean_logit = z.mean(1) if smoothing else None
    exp = z.sub_(row_max[:, None]).exp_()
    total = exp.sum(1)
    lse = total.log() + row_max
    loss = lse - (1.0 - smoothing) * label_logit
    if smoothing:
        loss -= smoothing * mean_logit
    loss_out.copy_(torch.where(valid, loss, 0.0))
    # (softmax - smoothed one-hot) * scale, with scale 0 on ignored rows.
    weight = scale * valid
    grad = exp.mul_((weight / total)[:, None])
    if smoothing:
        grad.sub_((weight * (smoothing / vocab))[:, None])
    grad.scatter_add_(1, target, (weight * (smoothing - 1.0))[:, None])
    return grad if grad.dtype == logits.dtype else logits.copy_(grad)


linear_cross_entropy = define_linear_cross_entropy(
    "linear_cross_entropy_chunked", lambda: _softmax_xent_torch, True, custom_op
)
linear_cross_entropy.__doc__ = """(loss, n_correct) of cross-entropy over ``x @ weight.T + bias``, as
:func:`bertfast.ops.reference.linear_cross_entropy`, in chunks of at most ``chunk_bytes`` of logits."""


def supports(*tensors: Tensor | None) -> bool:
    """CPU tensors of fp32/bf16/fp16 (float64 goes to the reference)."""
    present = [t for t in tensors if t is not None]
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for t in present)

"""The chunked linear + softmax cross-entropy that the CPU and Triton masked-LM losses share.

Rows go through in chunks holding at most ``chunk_bytes`` of logits (default 256 MB, or
``BERTFAST_CE_CHUNK_BYTES``); with few rows that is a single chunk and a single matmul. Per chunk:

1. ``logits = x_c @ W.T + b`` (torch matmul),
2. a softmax-cross-entropy over each row (the implementation's own: a Triton kernel, or torch ops):
   the loss and argmax-correctness, then ``softmax - ((1 - eps) * onehot + eps / V)`` times the
   reduction factor written over the logits in place,
3. ``grad_x_c = g @ W``, ``grad_W += g.T @ x_c`` (fp32 across chunks), ``grad_b += g.sum(0)``.

Backward of ``mean``/``sum`` only multiplies the gradients from forward by grad_output. ``none``
gives every row its own grad_output, which the summed grad_W and grad_b cannot take afterwards, so
its backward runs the chunks again with the per-row grad_output as the factor.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from bertfast.common import IGNORE_INDEX

DEFAULT_CHUNK_BYTES = 256 * 2**20
CHUNK_BYTES_ENV = "BERTFAST_CE_CHUNK_BYTES"
REDUCTIONS = ("mean", "sum", "none")


# An in-place softmax-cross-entropy over one chunk:
# (logits, labels, scale, ignore_index, smoothing, loss_out, correct_out) -> gradient in the logits' dtype.
SoftmaxXent = Callable[[Tensor, Tensor, Tensor, int, float, Tensor, Tensor], Tensor]


def chunk_rows(n_rows: int, bytes_per_row: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: as many as fit ``chunk_bytes`` (argument, else ``BERTFAST_CE_CHUNK_BYTES``,
    else 256 MB), spread evenly over the chunks that ``n_rows`` then needs."""
    if chunk_bytes is None:
        chunk_bytes = int(os.environ.get(CHUNK_BYTES_ENV, DEFAULT_CHUNK_BYTES))
    if n_rows == 0:
        return 1
    fit = max(1, chunk_bytes // bytes_per_row)
    n_chunks = -(-n_rows // fit)
    return -(-n_rows // n_chunks)


def _run_chunks(
    x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int, smoothing: float,
    scale: Tensor, need: tuple[bool, bool, bool], chunk_bytes: int | None,
    xent: SoftmaxXent, fp32_work_copy: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row loss and correctness, and the gradients in ``need`` (x, weight, bias) with each
    row's gradient times ``scale`` (one value, or one per row)."""
    rows, vocab = x.shape[0], weight.shape[0]
    loss = torch.zeros(rows, dtype=torch.float32, device=x.device)
    correct = torch.zeros(rows, dtype=torch.int32, device=x.device)
    work_bytes = 4 if fp32_work_copy and x.dtype != torch.float32 else 0
    step = chunk_rows(rows, vocab * (x.element_size() + work_bytes), chunk_bytes)
    chunked = rows > step
    grad_x = torch.empty_like(x) if need[0] else None
    # Several chunks add up grad_W and grad_b in fp32; one chunk's matmul already is the gradient.
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need[1] and chunked else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=x.device) if need[2] and chunked else None
    buffer = torch.empty(min(step, rows), vocab, dtype=x.dtype, device=x.device)
    for start in range(0, rows, step):
        end = min(start + step, rows)
        x_c = x[start:end]
        logits = buffer[: end - start]
        if bias is None:
            torch.mm(x_c, weight.T, out=logits)
        else:
            torch.addmm(bias, x_c, weight.T, out=logits)
        row_scale = scale if scale.numel() == 1 else scale[start:end]
        grad = xent(
            logits, labels[start:end], row_scale, ignore_index, smoothing, loss[start:end], correct[start:end]
        )
        if need[0]:
            torch.mm(grad, weight, out=grad_x[start:end])
        if need[1]:
            if not chunked:
                grad_w = grad.T @ x_c
            elif grad.dtype == torch.float32:
                grad_w.addmm_(grad.T, x_c)
            else:
                grad_w += grad.T @ x_c
        if need[2]:
            part = grad.sum(0, dtype=torch.float32)
            grad_b = grad_b.add_(part) if chunked else part
    if need[1]:
        grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
    if need[2]:
        grad_b = torch.zeros_like(bias) if grad_b is None else grad_b.to(bias.dtype)
    return loss, correct, grad_x, grad_w, grad_b


def _forward_fake(x, weight, bias, labels, ignore_index, smoothing, reduction, chunk_bytes, grads_needed):
    loss = x.new_empty(labels.shape if reduction == "none" else (), dtype=torch.float32)
    if reduction == "none":  # its gradients come from the backward op
        grads_needed = [False] * 3
    grads = [torch.empty_like(t) if t is not None and need else x.new_empty(0)
             for t, need in zip((x, weight, bias), grads_needed, strict=True)]
    return loss, labels.new_empty((), dtype=torch.int64), *grads


def _backward_fake(x, weight, bias, labels, row_scale, ignore_index, smoothing, chunk_bytes, grads_needed):
    return tuple(torch.empty_like(t) if t is not None and need else x.new_empty(0)
                 for t, need in zip((x, weight, bias), grads_needed, strict=True))


def _mean_factor(labels: Tensor, ignore_index: int) -> Tensor:
    """1 / (number of rows whose label is not ignore_index), 1 with none: the mean's factor, fp32."""
    return (labels != ignore_index).sum().clamp(min=1).to(torch.float32).reciprocal()


def _late_factor(x: Tensor, reduction: str) -> bool:
    # fp16 flushes softmax / n_valid to zero below 6e-8 (most of a 30k vocabulary), where the
    # reference, scaled by a loss scaler's grad_output, keeps it: fp16 gradients take the mean's
    # factor after the matmuls instead, together with grad_output.
    return reduction == "mean" and x.dtype == torch.float16


def define_linear_cross_entropy(
    name: str, xent: Callable[[], SoftmaxXent], fp32_work_copy: bool, define: Callable
) -> Callable:
    """The (forward, backward) ops of the chunked loss with ``xent()`` as its softmax-cross-entropy (looked up
    when a chunk runs, so that a test can wrap it).

    Forward also computes the gradients (in ``grads_needed``: x, weight, bias) for a grad_output of 1;
    backward only scales them. ``none`` gives every row its own grad_output, which the summed grad_W
    and grad_b cannot take afterwards: its gradients come from the backward op, which runs the chunks
    again with the per-row grad_output as the factor.
    """

    @define(name, _forward_fake)
    def forward(
        x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int, smoothing: float,
        reduction: str, chunk_bytes: int | None, grads_needed: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(loss, n_correct, grad_x, grad_weight, grad_bias); a gradient not needed is an empty tensor."""
        labels = labels.contiguous()
        ones = torch.ones(1, dtype=torch.float32, device=x.device)
        factor = _mean_factor(labels, ignore_index).reshape(1) if reduction == "mean" else ones
        need = (False, False, False) if reduction == "none" else tuple(grads_needed)
        with torch.autocast(x.device.type, enabled=False):
            loss, correct, *grads = _run_chunks(
                x, weight, bias, labels, ignore_index, smoothing, ones if _late_factor(x, reduction) else factor,
                need, chunk_bytes, xent(), fp32_work_copy,
            )
        grads = [x.new_empty(0) if g is None else g for g in grads]
        n_correct = correct.sum(dtype=torch.int64)
        if reduction == "none":
            return loss, n_correct, *grads
        total = loss.sum()
        if reduction == "mean":
            total = total / (labels != ignore_index).sum().clamp(min=1)
        return total, n_correct, *grads

    @define(f"{name}_backward", _backward_fake)
    def backward(
        x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, row_scale: Tensor, ignore_index: int,
        smoothing: float, chunk_bytes: int | None, grads_needed: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients with each row's gradient times ``row_scale`` (one value per row)."""
        with torch.autocast(x.device.type, enabled=False):
            _, _, *grads = _run_chunks(x, weight, bias, labels.contiguous(), ignore_index, smoothing, row_scale,
                                       tuple(grads_needed), chunk_bytes, xent(), fp32_work_copy)
        return tuple(x.new_empty(0) if g is None else g for g in grads)

    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, labels, ignore_index, smoothing, reduction, chunk_bytes, grads_needed = inputs
        _, _, *grads = output
        ctx.save_for_backward(x, weight, bias, labels, *grads)
        ctx.settings = (ignore_index, smoothing, reduction, chunk_bytes, grads_needed)

    def autograd_backward(ctx, grad_loss: Tensor, *_unused) -> tuple[Tensor | None, ...]:
        x, weight, bias, labels, *grads = ctx.saved_tensors
        ignore_index, smoothing, reduction, chunk_bytes, grads_needed = ctx.settings
        if reduction == "none":
            grads = backward(x, weight, bias, labels, grad_loss.float().reshape(-1), ignore_index, smoothing,
                             chunk_bytes, grads_needed)
        else:
            scale = grad_loss * _mean_factor(labels, ignore_index) if _late_factor(x, reduction) else grad_loss
            grads = [g * scale.to(g.dtype) for g in grads]
        grads = [g if need else None for g, need in zip(grads, grads_needed, strict=True)]
        return *grads, None, None, None, None, None, None

    forward.register_autograd(autograd_backward, setup_context=setup_context)

    def linear_cross_entropy(
        x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int = IGNORE_INDEX,
        label_smoothing: float = 0.0, reduction: str = "mean", chunk_bytes: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # The matmuls run in the autocast dtype, as F.linear would; the casts carry the gradients back.
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        needed = [t is not None and t.requires_grad and torch.is_grad_enabled() for t in (x, weight, bias)]
        loss, n_correct, *_ = forward(x, weight, bias, labels, ignore_index, float(label_smoothing), reduction,
                                      chunk_bytes, needed)
        return loss, n_correct

    linear_cross_entropy.forward_op = forward
    linear_cross_entropy.backward_op = backward
    return linear_cross_entropy

"""Fused decoder matmul + softmax cross-entropy: the masked-LM loss without the (rows, vocab) logits.

Rows go through in chunks holding at most ``chunk_bytes`` of logits (default 256 MB, or
``BERTFAST_CE_CHUNK_BYTES``); with few rows that is a single chunk and a single matmul. Per chunk:

1. ``logits = x_c @ W.T + b`` (torch matmul),
2. one kernel program per row: an online log-sum-exp over the vocabulary in fp32 (first loop),
   the loss and argmax-correctness, then ``softmax - ((1 - eps) * onehot + eps / V)`` times the
   reduction factor written over the logits in place (second loop),
3. ``grad_x_c = g @ W``, ``grad_W += g.T @ x_c`` (fp32 across chunks), ``grad_b += g.sum(0)``.

Backward of ``mean``/``sum`` only multiplies the gradients from forward by grad_output. ``none``
gives every row its own grad_output, which the summed grad_W and grad_b cannot take afterwards, so
its backward runs the chunks again with the per-row grad_output as the factor.

:func:`linear_cross_entropy_torch` is the same algorithm with torch ops in place of the kernel,
for CPU tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.kernels.aot import AotSpec, meta, record, spec
from bertfast.ops.library import TRITON_INTERPRETED, custom_op, kernel_op, wrap_triton
from bertfast.ops.reference import IGNORE_INDEX

DEFAULT_CHUNK_BYTES = 256 * 2**20
CHUNK_BYTES_ENV = "BERTFAST_CE_CHUNK_BYTES"
REDUCTIONS = ("mean", "sum", "none")
_DTYPES = ("fp32", "bf16", "fp16")
_BLOCKS = (256, 512, 1024, 2048, 4096)


@triton.jit
def _softmax_xent_kernel(
    logits_ptr,  # (rows, V), overwritten with the scaled gradient
    labels_ptr,  # (rows,) int64
    scale_ptr,  # fp32 factor of each row's gradient: one value (scale_stride 0) or one per row
    scale_stride,
    loss_ptr,  # (rows,) fp32
    correct_ptr,  # (rows,) int32
    V,
    ignore_index,
    smoothing,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    offs = tl.arange(0, BLOCK_V)

    # Per-lane running max, sum of exp relative to it, argmax and plain sum (for label smoothing);
    # combined across lanes once, after the loop.
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    run_arg = tl.zeros([BLOCK_V], tl.int32)
    run_total = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        # Lanes that have only seen padding stay at -inf: shift them by 0 (exp(-inf + inf) is nan).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(x - shift)
        run_arg = tl.where(x > run_max, cols, run_arg)  # strict: the first maximum wins, as torch.argmax
        run_max = new_max
        run_total += tl.where(in_row, x, 0.0)
    row_max = tl.max(run_max, 0)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), 0))
    argmax = tl.min(tl.where(run_max == row_max, run_arg, V), 0)

    # Labels are in [0, V) or ignore_index; this only keeps a bad label from reading out of bounds.
    target = tl.where(valid & (label >= 0) & (label < V), label, 0)
    x_label = tl.load(row_ptr + target).to(tl.float32)
    loss = lse - (1.0 - smoothing) * x_label - smoothing * (tl.sum(run_total, 0) / V)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(correct_ptr + row, (valid & (argmax == label)).to(tl.int32))

    scale = tl.where(valid, tl.load(scale_ptr + row * scale_stride), 0.0)
    off_target = smoothing / V
    on_target = 1.0 - smoothing
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        in_row = cols < V
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - off_target - tl.where(cols == label, on_target, 0.0)
        tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=in_row)


def _block_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps): a block of the vocabulary per loop step, up to 8 values per thread."""
    block = min(max(triton.next_power_of_2(vocab), _BLOCKS[0]), _BLOCKS[-1])
    return block, max(4, block // 256)


# An in-place softmax-cross-entropy over one chunk:
# (logits, labels, scale, ignore_index, smoothing, loss_out, correct_out) -> gradient in the logits' dtype.
SoftmaxXent = Callable[[Tensor, Tensor, Tensor, int, float, Tensor, Tensor], Tensor]


def _softmax_xent_triton(
    logits: Tensor, labels: Tensor, scale: Tensor, ignore_index: int, smoothing: float,
    loss_out: Tensor, correct_out: Tensor,
) -> Tensor:
    rows, vocab = logits.shape
    block, num_warps = _block_config(vocab)
    wrap_triton(_softmax_xent_kernel)[(rows,)](
        logits, labels, scale, 1 if scale.numel() > 1 else 0, loss_out, correct_out,
        vocab, ignore_index, smoothing, BLOCK_V=block, num_warps=num_warps,
    )
    return logits


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


# The softmax-cross-entropy of each variant, looked up when a chunk runs.
XENT: dict[str, SoftmaxXent] = {"triton": _softmax_xent_triton, "torch": _softmax_xent_torch}


def _define(name: str, xent: str, fp32_work_copy: bool, define: Callable) -> Callable:
    """The (forward, backward) ops of the chunked loss with ``XENT[xent]`` as its softmax-cross-entropy.

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
                need, chunk_bytes, XENT[xent], fp32_work_copy,
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
                                       tuple(grads_needed), chunk_bytes, XENT[xent], fp32_work_copy)
        return tuple(x.new_empty(0) if g is None else g for g in grads)

    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, labels, ignore_index, smoothing, reduction, chunk_bytes, grads_needed = inputs
        _, _, *grads = output
        # Eager, the gradients are not saved tensors: the first backward scales them in place and drops
        # them, so grad_W is neither copied nor kept with the graph (detached: no reference cycle through
        # the node). Traced (fake or functional tensors), the graph only sees them as saved tensors.
        eager = all(type(g) is Tensor for g in grads)
        ctx.grads = [g.detach() for g in grads] if eager else None
        ctx.save_for_backward(x, weight, bias, labels, *(() if eager else grads))
        ctx.settings = (ignore_index, smoothing, reduction, chunk_bytes, grads_needed)
        # The gradient outputs get no grad_output: without this, autograd would build zeros the size of
        # each one (grad_W included) for backward.
        ctx.set_materialize_grads(False)

    def autograd_backward(ctx, grad_loss: Tensor | None, *_unused) -> tuple[Tensor | None, ...]:
        x, weight, bias, labels, *saved = ctx.saved_tensors
        ignore_index, smoothing, reduction, chunk_bytes, grads_needed = ctx.settings
        if grad_loss is None:  # the loss itself took no part in what is differentiated
            return None, None, None, None, None, None, None, None, None
        grads, ctx.grads = ctx.grads, None
        scale = grad_loss * _mean_factor(labels, ignore_index) if _late_factor(x, reduction) else grad_loss
        if reduction != "none" and saved:
            grads = [g * scale.to(g.dtype) for g in saved]
        elif reduction != "none" and grads is not None:
            grads = [g.mul_(scale.to(g.dtype)) for g in grads]
        else:  # a grad_output per row, or a second backward through a retained graph
            row_scale = grad_loss.float().reshape(-1)
            if reduction == "mean":
                row_scale = row_scale * _mean_factor(labels, ignore_index)
            grads = backward(x, weight, bias, labels, row_scale, ignore_index, smoothing, chunk_bytes, grads_needed)
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


linear_cross_entropy = _define(
    "linear_cross_entropy_triton", "triton", False,
    lambda name, fake: kernel_op(name, fake, traceable=False),
)
linear_cross_entropy.__doc__ = """(loss, n_correct) of cross-entropy over ``x @ weight.T + bias``, as
:func:`bertfast.ops.reference.linear_cross_entropy`, with the Triton softmax-cross-entropy kernel.

At most ``chunk_bytes`` of logits exist at once. An opaque op even under ``torch.compile`` on a GPU: the
number of chunks depends on the (data-dependent) number of rows.
"""

linear_cross_entropy_torch = _define("linear_cross_entropy_chunked", "torch", True, custom_op)
linear_cross_entropy_torch.__doc__ = """The same chunked algorithm in plain PyTorch (an in-place softmax
instead of the kernel), for CPU tensors.

fp16/bf16 chunks also hold an fp32 work copy of their logits, counted in ``chunk_bytes``.
"""


def supports(*tensors: Tensor | None) -> bool:
    """CUDA tensors (CPU ones in the interpreter) of fp32/bf16/fp16."""
    present = [t for t in tensors if t is not None]
    return all((t.device.type == "cuda" or (TRITON_INTERPRETED and t.device.type == "cpu"))
               and t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in present)


def supports_chunked(*tensors: Tensor | None) -> bool:
    """The chunked PyTorch version: CPU tensors of fp32/bf16/fp16 (float64 goes to the reference)."""
    present = [t for t in tensors if t is not None]
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
               for t in present)


def aot_specs() -> list[AotSpec]:
    specs = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for block in _BLOCKS:  # a vocabulary of BLOCK_V reaches each block size
            (launch,) = record(_softmax_xent_triton, meta(4, block, dtype=dtype), meta(4, dtype=torch.int64), meta(1),
                               IGNORE_INDEX, 0.0, meta(4), meta(4, dtype=torch.int32))
            specs.append(spec(f"softmax_xent[BLOCK_V={block},{name}]", launch))
    return specs

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

The chunking is ``bertfast.common.chunked_loss``'s, shared with the CPU implementation
(``bertfast.ops.chunked_cross_entropy``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.common import IGNORE_INDEX
from bertfast.common.chunked_loss import define_linear_cross_entropy
from bertfast.common.library import TRITON_INTERPRETED, kernel_op, wrap_triton
from bertfast.kernels.aot import AotSpec, meta, record, spec

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


linear_cross_entropy = define_linear_cross_entropy(
    "linear_cross_entropy_triton", lambda: _softmax_xent_triton, False,
    lambda name, fake: kernel_op(name, fake, traceable=False),
)
linear_cross_entropy.__doc__ = """(loss, n_correct) of cross-entropy over ``x @ weight.T + bias``, as
:func:`bertfast.ops.reference.linear_cross_entropy`, with the Triton softmax-cross-entropy kernel.

At most ``chunk_bytes`` of logits exist at once. An opaque op even under ``torch.compile`` on a GPU: the
number of chunks depends on the (data-dependent) number of rows.
"""

def supports(*tensors: Tensor | None) -> bool:
    """CUDA tensors (CPU ones in the interpreter) of fp32/bf16/fp16."""
    present = [t for t in tensors if t is not None]
    return all((t.device.type == "cuda" or (TRITON_INTERPRETED and t.device.type == "cpu"))
               and t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in present)


def aot_specs() -> list[AotSpec]:
    specs = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for block in _BLOCKS:  # a vocabulary of BLOCK_V reaches each block size
            (launch,) = record(_softmax_xent_triton, meta(4, block, dtype=dtype), meta(4, dtype=torch.int64), meta(1),
                               IGNORE_INDEX, 0.0, meta(4), meta(4, dtype=torch.int32))
            specs.append(spec(f"softmax_xent[BLOCK_V={block},{name}]", launch))
    return specs

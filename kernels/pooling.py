"""Sentence-embedding pooling of packed sequences, optionally L2-normalised: one op, forward and backward.

Forward, per sequence b with rows [s, e) of the packed (T, H) input (in fp32)::

    mean: p = sum(h[s:e]) / max(e - s, 1)      cls: p = h[s] (zeros when e == s)
    normalize: y = p / max(||p||, eps)          else y = p

Backward: with normalisation, dp = (dy - y * <y, dy>) / ||p|| where ||p|| >= eps, else dy / eps (the
gradient of ``F.normalize``); then mean: dh[s:e] = dp / (e - s); cls: dh[s] = dp, zeros elsewhere.

One program per sequence holds a whole row of H (BLOCK_N = next power of two) and walks the
sequence's rows in tiles of BLOCK_T; the forward keeps the fp32 p (batch, H) for the backward when it
normalises. ``cu_seqlens`` must start at 0 and end at T, so the backward writes every row of dh.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.common.library import kernel_op, wrap_triton
from bertfast.kernels.aot import AotSpec, meta, record, spec
from bertfast.kernels.layernorm_common import DTYPES, MAX_HIDDEN, kernels_run

_TILE = 4096  # elements of h per loop iteration: 32 per thread with 4 warps
_NUM_WARPS = 4
NORMALIZE_EPS = 1e-12  # F.normalize's (and the reference's)


def _tile_config(hidden: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_N): a whole row of H, and as many rows as fill the tile."""
    block_n = triton.next_power_of_2(max(hidden, 1))
    return max(1, _TILE // block_n), block_n


@triton.jit
def _pooling_fwd_kernel(
    h_ptr, cu_ptr, y_ptr, pooled_ptr, N, eps,
    MEAN: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    length = end - start
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if MEAN:
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for t in range(start, end, BLOCK_T):
            rows = t + tl.arange(0, BLOCK_T)
            mask = (rows < end)[:, None] & col_mask[None, :]
            offsets = tl.cast(rows, tl.int64)[:, None] * N + cols[None, :]
            acc += tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p = tl.sum(acc, axis=0) / tl.maximum(length, 1).to(tl.float32)
    else:
        first = tl.cast(start, tl.int64) * N + cols
        p = tl.load(h_ptr + first, mask=cols < tl.where(length > 0, N, 0), other=0.0).to(tl.float32)
    out = tl.cast(b, tl.int64) * N + cols
    if NORMALIZE:
        tl.store(pooled_ptr + out, p, mask=col_mask)
        p = p / tl.maximum(tl.sqrt(tl.sum(p * p, axis=0)), eps)
    tl.store(y_ptr + out, p.to(y_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _pooling_bwd_kernel(
    dy_ptr, pooled_ptr, cu_ptr, dh_ptr, N, eps,
    MEAN: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b)
    end = tl.load(cu_ptr + b + 1)
    length = end - start
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    row = tl.cast(b, tl.int64) * N + cols
    dp = tl.load(dy_ptr + row, mask=col_mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        p = tl.load(pooled_ptr + row, mask=col_mask, other=0.0)
        norm = tl.sqrt(tl.sum(p * p, axis=0))
        y = p / tl.maximum(norm, eps)
        projected = (dp - y * tl.sum(y * dp, axis=0)) / tl.maximum(norm, eps)
        dp = tl.where(norm >= eps, projected, dp / eps)
    if MEAN:
        dp = dp / tl.maximum(length, 1).to(tl.float32)
    for t in range(start, end, BLOCK_T):
        rows = t + tl.arange(0, BLOCK_T)
        mask = (rows < end)[:, None] & col_mask[None, :]
        offsets = tl.cast(rows, tl.int64)[:, None] * N + cols[None, :]
        if MEAN:
            g = tl.broadcast_to(dp[None, :], (BLOCK_T, BLOCK_N))
        else:
            g = tl.where((rows == start)[:, None], dp[None, :], 0.0)
        tl.store(dh_ptr + offsets, g.to(dh_ptr.dtype.element_ty), mask=mask)


def pooling_forward(hidden: Tensor, cu_seqlens: Tensor, mean: bool, normalize: bool) -> tuple[Tensor, Tensor]:
    """(y, the fp32 pooled vectors before normalisation; empty without it)."""
    n = hidden.shape[1]
    batch = cu_seqlens.shape[0] - 1
    y = torch.empty((batch, n), dtype=hidden.dtype, device=hidden.device)
    pooled = torch.empty((batch, n) if normalize else (0,), dtype=torch.float32, device=hidden.device)
    block_t, block_n = _tile_config(n)
    wrap_triton(_pooling_fwd_kernel)[(batch,)](
        hidden, cu_seqlens, y, pooled, n, NORMALIZE_EPS, MEAN=mean, NORMALIZE=normalize, BLOCK_T=block_t,
        BLOCK_N=block_n, num_warps=_NUM_WARPS,
    )
    return y, pooled


def pooling_backward(dy: Tensor, pooled: Tensor, cu_seqlens: Tensor, rows: int, mean: bool,
                     normalize: bool) -> Tensor:
    """dh (rows, H) in dy's dtype (the forward's output dtype, which is the input's)."""
    n = dy.shape[1]
    dh = dy.new_empty(rows, n)
    block_t, block_n = _tile_config(n)
    wrap_triton(_pooling_bwd_kernel)[(cu_seqlens.shape[0] - 1,)](
        dy, pooled, cu_seqlens, dh, n, NORMALIZE_EPS, MEAN=mean, NORMALIZE=normalize, BLOCK_T=block_t,
        BLOCK_N=block_n, num_warps=_NUM_WARPS,
    )
    return dh


def _forward_fake(hidden: Tensor, cu_seqlens: Tensor, mode: str, normalize: bool) -> tuple[Tensor, Tensor]:
    batch, n = cu_seqlens.shape[0] - 1, hidden.shape[1]
    return hidden.new_empty(batch, n), hidden.new_empty((batch, n) if normalize else (0,), dtype=torch.float32)


@kernel_op("pooling_triton", _forward_fake)
def _forward_op(hidden: Tensor, cu_seqlens: Tensor, mode: str, normalize: bool) -> tuple[Tensor, Tensor]:
    return pooling_forward(hidden.contiguous(), cu_seqlens.to(torch.int32).contiguous(), mode == "mean", normalize)


def _backward_fake(dy: Tensor, pooled: Tensor, cu_seqlens: Tensor, rows: int, mode: str,
                   normalize: bool) -> Tensor:
    return dy.new_empty(rows, dy.shape[1])


@kernel_op("pooling_triton_backward", _backward_fake)
def _backward_op(dy: Tensor, pooled: Tensor, cu_seqlens: Tensor, rows: int, mode: str,
                 normalize: bool) -> Tensor:
    return pooling_backward(dy.contiguous(), pooled, cu_seqlens.to(torch.int32).contiguous(), rows,
                            mode == "mean", normalize)


def _setup_context(ctx, inputs, output) -> None:
    hidden, cu_seqlens, ctx.mode, ctx.normalize = inputs
    ctx.save_for_backward(output[1], cu_seqlens)
    ctx.rows = hidden.shape[0]  # the input itself is not needed


def _backward(ctx, dy: Tensor, _dpooled) -> tuple[Tensor | None, ...]:
    pooled, cu_seqlens = ctx.saved_tensors
    dh = _backward_op(dy, pooled, cu_seqlens, ctx.rows, ctx.mode, ctx.normalize)
    return dh, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def supports(*tensors: Tensor | None, mode: str = "mean", normalize: bool = False) -> bool:
    """CUDA (or the interpreter), fp32/bf16/fp16, rows of at most MAX_HIDDEN."""
    return kernels_run(*tensors) and tensors[0].shape[-1] <= MAX_HIDDEN


def pooling(hidden: Tensor, cu_seqlens: Tensor, mode: str = "mean", normalize: bool = False) -> Tensor:
    """(batch, H) mean or first-row vectors of packed (T, H) ``hidden``; see the module docstring."""
    return _forward_op(hidden, cu_seqlens, mode, normalize)[0]


def aot_specs() -> list[AotSpec]:
    """MiniLM's and BERT-base's hidden sizes, every dtype, mean and cls, with and without normalisation."""
    specs = []
    for hidden in (384, 768):
        for dtype, tag in DTYPES.items():
            h, cu, dy = meta(64, hidden, dtype=dtype), meta(5, dtype=torch.int32), meta(4, hidden, dtype=dtype)
            for mean in (True, False):
                for normalize in (True, False):
                    name = f"H={hidden},{tag},{'mean' if mean else 'cls'}" + (",normalize" if normalize else "")
                    (fwd,) = record(pooling_forward, h, cu, mean, normalize)
                    pooled = meta(4, hidden) if normalize else meta(0)
                    (bwd,) = record(pooling_backward, dy, pooled, cu, 64, mean, normalize)
                    specs += [spec(f"pooling_fwd[{name}]", fwd), spec(f"pooling_bwd[{name}]", bwd)]
    return specs

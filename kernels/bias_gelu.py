"""gelu(x + bias): the feed-forward intermediate activation.

Forward, per element (u = x + bias, computed in fp32)::

    exact: y = u / 2 * (1 + erf(u / sqrt(2)))
    tanh:  y = u / 2 * (1 + tanh(sqrt(2 / pi) * (u + 0.044715 u^3)))

Backward: dx = dy * gelu'(u) and dbias = sum over rows of dx. The forward keeps only x
and bias (u is recomputed); dbias is reduced with per-program fp32 partials.

Inputs are (rows, N) (extra leading dims are flattened), any N; tiles of BLOCK_M x BLOCK_N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.common.library import kernel_op, wrap_triton
from bertfast.kernels.aot import AotSpec, meta, record, spec
from bertfast.kernels.layernorm_common import (
    DTYPES,
    bias_or_zeros,
    dtype_tag,
    gelu,
    gelu_grad,
    kernels_run,
    partial_programs,
    reduce_partials,
)

_TILE = 2048  # elements per program: 16 per thread with 4 warps
_NUM_WARPS = 4


def _tile_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): a column tile of up to 1024 (3072 and 4096 split exactly)."""
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    return _TILE // block_n, block_n


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr, bias_ptr, y_ptr, M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    offsets = tl.cast(rows, tl.int64)[:, None] * N + cols[None, :]
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    tl.store(y_ptr + offsets, gelu(u, APPROX_TANH).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, dx_ptr, dbias_partial_ptr, M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    # Program (g, c) walks row blocks g, g + G, ... of column tile c, summing dx for dbias.
    g = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row_block in range(g, tl.cdiv(M, BLOCK_M), n_programs):
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offsets = tl.cast(rows, tl.int64)[:, None] * N + cols[None, :]
        u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dx = tl.where(mask, dy * gelu_grad(u, APPROX_TANH), 0.0)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, axis=0)
    tl.store(dbias_partial_ptr + g.to(tl.int64) * N + cols, dbias, mask=col_mask)


def _out_dtype(x: Tensor, bias: Tensor | None) -> torch.dtype:
    return x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)


def bias_gelu_forward(x2d: Tensor, bias: Tensor, out_dtype: torch.dtype, approx_tanh: bool) -> Tensor:
    m, n = x2d.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x2d.device)
    block_m, block_n = _tile_config(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))  # no programs at all for 0 rows
    wrap_triton(_bias_gelu_fwd_kernel)[grid](
        x2d, bias, y, m, n, BLOCK_M=block_m, BLOCK_N=block_n, APPROX_TANH=approx_tanh,
        num_warps=_NUM_WARPS,
    )
    return y


def bias_gelu_backward(dy2d: Tensor, x2d: Tensor, bias: Tensor, approx_tanh: bool) -> tuple[Tensor, Tensor]:
    m, n = x2d.shape
    dx = torch.empty_like(x2d)
    block_m, block_n = _tile_config(n)
    n_col_tiles = triton.cdiv(n, block_n)
    programs = partial_programs(triton.cdiv(m, block_m), x2d.device, share=n_col_tiles)
    partials = torch.zeros((programs, n), dtype=torch.float32, device=x2d.device)
    wrap_triton(_bias_gelu_bwd_kernel)[(programs, n_col_tiles)](
        dy2d, x2d, bias, dx, partials, m, n, BLOCK_M=block_m, BLOCK_N=block_n, APPROX_TANH=approx_tanh,
        num_warps=_NUM_WARPS,
    )
    return dx, reduce_partials(partials).to(bias.dtype)


def _forward_fake(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    return x.new_empty(x.shape, dtype=_out_dtype(x, bias))


@kernel_op("bias_gelu_triton", _forward_fake)
def _forward_op(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    n = x.shape[-1]
    b = bias_or_zeros(bias, x)
    y = bias_gelu_forward(x.reshape(-1, n).contiguous(), b, _out_dtype(x, bias), approximate == "tanh")
    return y.view(x.shape)


def _backward_fake(dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[-1], dtype=x.dtype if bias is None else bias.dtype)


@kernel_op("bias_gelu_triton_backward", _backward_fake)
def _backward_op(dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    b = bias_or_zeros(bias, x)
    dx, dbias = bias_gelu_backward(dy.reshape(-1, n).contiguous(), x.reshape(-1, n).contiguous(), b,
                                   approximate == "tanh")
    return dx.view(x.shape), dbias


def _setup_context(ctx, inputs, output) -> None:
    x, bias, ctx.approximate = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
    x, bias = ctx.saved_tensors
    dx, dbias = _backward_op(dy, x, bias, ctx.approximate)
    return dx, dbias if bias is not None else None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def supports(*tensors: Tensor | None, approximate: str = "none") -> bool:
    """Triton runs these tensors: CUDA (or the interpreter) and fp32/bf16/fp16."""
    return kernels_run(*tensors)


def bias_gelu(x: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """gelu(x + bias) on the last dim of ``x``; see the module docstring."""
    return _forward_op(x, bias, approximate)


def aot_specs() -> list[AotSpec]:
    """At N = 3072 (BERT's intermediate size): every dtype, autocast's bf16 x with an fp32 bias, tanh once."""
    specs = []
    for act, dtype, approx in [(torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, False),
                               (torch.float16, torch.float16, False), (torch.bfloat16, torch.float32, False),
                               (torch.bfloat16, torch.bfloat16, True)]:
        tag = f"N=3072,{dtype_tag(DTYPES[act], DTYPES[dtype])}" + (",tanh" if approx else "")
        x, bias = meta(8, 3072, dtype=act), meta(3072, dtype=dtype)
        (fwd,) = record(bias_gelu_forward, x, bias, dtype, approx)
        (bwd,) = record(bias_gelu_backward, meta(8, 3072, dtype=dtype), x, bias, approx)
        specs += [spec(f"bias_gelu_fwd[{tag}]", fwd), spec(f"bias_gelu_bwd[{tag}]", bwd)]
    return specs

"""LayerNorm(dropout(x + bias) + residual): the end of the attention and feed-forward blocks.

Forward, per row of H values (fp32 inside)::

    u = dropout(x + bias)            # keep with prob 1 - p, kept values * 1 / (1 - p)
    h = u + residual
    mean = sum(h) / H;  rstd = 1 / sqrt(sum((h - mean)^2) / H + eps)
    y = (h - mean) * rstd * gamma + beta

The forward stores y and (mean, rstd) per row. The dropout mask is never stored: the counter
hash of (seed, row, column) regenerates it, and the backward recomputes h from x, bias and
residual (which autograd keeps alive anyway) instead of writing h out. Backward::

    dresidual = dh = LayerNorm backward of dy (see ``layernorm_common``)
    dx = dropout-mask(dh) * 1 / (1 - p);  dbias = sum_rows dx
    dgamma = sum_rows dy * x_hat;  dbeta = sum_rows dy

Without dropout, dx is dresidual: one tensor serves both (as autograd's own add does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.common import dropout
from bertfast.common.library import kernel_op, wrap_triton
from bertfast.kernels.aot import AotSpec, meta, record, spec
from bertfast.kernels.layernorm_common import (
    MAX_HIDDEN,
    aot_rows,
    bias_or_zeros,
    dropout_keep,
    kernels_run,
    layernorm_row,
    layernorm_row_grad,
    partial_programs,
    partial_sums,
    reduce_partials,
    row_config,
    row_outputs,
    row_tag,
    store_ln_partials,
)


@triton.jit
def _bdal_fwd_kernel(
    x_ptr, bias_ptr, res_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, seed_ptr,
    H, eps, threshold, scale,
    BLOCK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    offsets = row.to(tl.int64) * H + cols
    u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        u = tl.where(dropout_keep(tl.load(seed_ptr), row, cols, threshold), u * scale, 0.0)
    h = u + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = layernorm_row(h, cols, mask, H, eps, w_ptr, b_ptr)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _bdal_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, res_ptr, w_ptr, mean_ptr, rstd_ptr, seed_ptr,
    dres_ptr, dx_ptr, partial_ptr,
    n_rows, H, threshold, scale,
    BLOCK: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DX: tl.constexpr,
):
    # Program g walks rows g, g + G, ...; partials: (3, G, H) = dgamma, dbeta, dbias.
    g = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for row in range(g, n_rows, n_programs):
        offsets = tl.cast(row, tl.int64) * H + cols
        u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + bias
        if HAS_DROPOUT:
            keep = dropout_keep(seed, row, cols, threshold)
            u = tl.where(keep, u * scale, 0.0)
        h = u + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = tl.where(mask, (h - tl.load(mean_ptr + row)) * rstd, 0.0)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dh = layernorm_row_grad(x_hat, dy, w, rstd, H)
        tl.store(dres_ptr + offsets, dh.to(dres_ptr.dtype.element_ty), mask=mask)
        du = dh
        if HAS_DROPOUT:
            du = tl.where(keep, dh * scale, 0.0)
        if STORE_DX:
            tl.store(dx_ptr + offsets, du.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
        dbias += du
    store_ln_partials(partial_ptr, g, n_programs, H, cols, mask, dw, db, dbias)


def _out_dtype(x: Tensor, bias: Tensor | None, residual: Tensor) -> torch.dtype:
    dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    return torch.promote_types(dtype, residual.dtype)


def _stores_dx(x: Tensor, residual: Tensor, seed: Tensor | None) -> bool:
    """Whether backward writes dx apart from dresidual: with a mask or a cast between them."""
    return seed is not None or x.dtype != residual.dtype


def _forward_fake(x, bias, residual, ln_weight, ln_bias, seed, eps, p):
    rows = x.numel() // x.shape[-1]
    y = x.new_empty(x.shape, dtype=_out_dtype(x, bias, residual))
    return y, x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _launch_forward(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor, seed: Tensor | None,
    eps: float, p: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); dropout with probability ``p`` where a seed is given."""
    hidden = x.shape[-1]
    x2d, res2d = x.reshape(-1, hidden).contiguous(), residual.reshape(-1, hidden).contiguous()
    rows = x2d.shape[0]
    y, mean, rstd = row_outputs(rows, hidden, _out_dtype(x, bias, residual), x.device)
    block, num_warps = row_config(hidden)
    wrap_triton(_bdal_fwd_kernel)[(rows,)](
        x2d, bias_or_zeros(bias, x), res2d, ln_weight.contiguous(), ln_bias.contiguous(), y, mean, rstd, seed,
        hidden, eps, dropout.threshold(p), dropout.scale(p), BLOCK=block, HAS_DROPOUT=seed is not None,
        num_warps=num_warps,
    )
    return y.view(x.shape), mean, rstd


_forward_op = kernel_op("bias_dropout_add_layernorm_triton", _forward_fake)(_launch_forward)


def _backward_fake(dy, x, bias, residual, ln_weight, mean, rstd, seed, p):
    hidden = x.shape[-1]
    dx = torch.empty_like(x) if _stores_dx(x, residual, seed) else x.new_empty(0)
    dbias = x.new_empty(hidden, dtype=x.dtype if bias is None else bias.dtype)
    w = ln_weight.new_empty(hidden, dtype=torch.float32)
    return dx, dbias, torch.empty_like(residual), w, torch.empty_like(w)


def _launch_backward(
    dy: Tensor, x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, mean: Tensor, rstd: Tensor,
    seed: Tensor | None, p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, or an empty tensor when dx is dresidual; dbias; dresidual; fp32 dgamma, dbeta)."""
    hidden = x.shape[-1]
    x2d, res2d = x.reshape(-1, hidden).contiguous(), residual.reshape(-1, hidden).contiguous()
    rows = x2d.shape[0]
    b = bias_or_zeros(bias, x)
    store_dx = _stores_dx(x, residual, seed)
    dres = torch.empty_like(res2d)
    dx = torch.empty_like(x2d) if store_dx else dres
    programs = partial_programs(rows, x.device)
    partials = partial_sums(3, programs, hidden, x.device)
    block, num_warps = row_config(hidden)
    wrap_triton(_bdal_bwd_kernel)[(programs,)](
        dy.reshape(-1, hidden).contiguous(), x2d, b, res2d, ln_weight.contiguous(), mean, rstd, seed, dres, dx,
        partials, rows, hidden, dropout.threshold(p), dropout.scale(p),
        BLOCK=block, HAS_DROPOUT=seed is not None, STORE_DX=store_dx, num_warps=num_warps,
    )
    dw, db, dbias = (reduce_partials(sums) for sums in partials)  # separate tensors: op outputs may not alias
    return (dx.view(x.shape) if store_dx else x.new_empty(0)), dbias.to(b.dtype), dres.view(residual.shape), dw, db


_backward_op = kernel_op("bias_dropout_add_layernorm_triton_backward", _backward_fake)(_launch_backward)


def _setup_context(ctx, inputs, output) -> None:
    x, bias, residual, ln_weight, ln_bias, seed, _, ctx.p = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, bias, residual, ln_weight, mean, rstd, seed)
    ctx.ln_bias_dtype = ln_bias.dtype


def _backward(ctx, dy: Tensor, _dmean, _drstd) -> tuple[Tensor | None, ...]:
    x, bias, residual, ln_weight, mean, rstd, seed = ctx.saved_tensors
    dx, dbias, dres, dw, db = _backward_op(dy, x, bias, residual, ln_weight, mean, rstd, seed, ctx.p)
    if not _stores_dx(x, residual, seed):
        dx = dres.view(x.shape)
    return (dx, dbias if bias is not None else None, dres, dw.to(ln_weight.dtype), db.to(ctx.ln_bias_dtype),
            None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def supports(*tensors: Tensor | None) -> bool:
    """CUDA (or the interpreter), fp32/bf16/fp16, rows of at most MAX_HIDDEN."""
    return kernels_run(*tensors) and tensors[0].shape[-1] <= MAX_HIDDEN


def bias_dropout_add_layernorm(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    eps: float, dropout_p: float, training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual) over the last dim; see the module docstring."""
    seed = dropout.draw_seed(x.device) if training and dropout_p > 0.0 else None
    return _forward_op(x, bias, residual, ln_weight, ln_bias, seed, eps, dropout_p)[0]


def aot_specs() -> list[AotSpec]:
    specs = []
    for hidden, act, dt, tuned in aot_rows():
        tag = row_tag(hidden, act, dt)
        x, bias, res, w, b = meta(4, hidden, dtype=act), *(meta(*shape, dtype=dt) for shape in (
            (hidden,), (4, hidden), (hidden,), (hidden,)))
        mean, rstd = meta(4), meta(4)
        for seed, p, kind in ((meta(dtype=torch.int64), 0.1, "dropout"), (None, 0.0, "eval")):
            (fwd,) = record(_launch_forward, x, bias, res, w, b, seed, 1e-12, p)
            (bwd,) = record(_launch_backward, meta(4, hidden, dtype=dt), x, bias, res, w, mean, rstd, seed, p)
            specs += [spec(f"bdal_fwd[{tag},{kind}]", fwd, tuned=tuned), spec(f"bdal_bwd[{tag},{kind}]", bwd,
                                                                              tuned=tuned)]
    return specs

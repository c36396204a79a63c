"""LayerNorm(dropout(x + bias) + residual): the end of the attention and feed-forward blocks.

Forward, per row of H values (fp32 inside)::

    u = dropout(x + bias)            # keep with prob 1 - p, kept values * 1 / (1 - p)
    h = u + residual
    mean = sum(h) / H;  rstd = 1 / sqrt(sum((h - mean)^2) / H + eps)
    y = (h - mean) * rstd * gamma + beta

The forward stores y and (mean, rstd) per row. The dropout mask is never stored: Philox
(seed, element index) regenerates it, and the backward recomputes h from x, bias and
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

from bertfast.kernels.aot import AotSpec
from bertfast.kernels.layernorm_common import (
    DTYPES,
    MAX_HIDDEN,
    aot_row_configs,
    check_dropout,
    draw_seed,
    dropout_keep,
    dropout_scale,
    dtype_tag,
    kernels_available,
    layernorm_row,
    layernorm_row_grad,
    partial_programs,
    reduce_partials,
    row_config,
    store_ln_partials,
)
from bertfast.ops import reference


@triton.jit
def _bdal_fwd_kernel(
    x_ptr, bias_ptr, res_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, seed_ptr,
    H, eps, p, scale,
    BLOCK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    offsets = row.to(tl.int64) * H + cols
    u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        u = tl.where(dropout_keep(tl.load(seed_ptr), offsets, p), u * scale, 0.0)
    h = u + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = layernorm_row(h, cols, mask, H, eps, w_ptr, b_ptr)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _bdal_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, res_ptr, w_ptr, mean_ptr, rstd_ptr, seed_ptr,
    dres_ptr, dx_ptr, partial_ptr,
    n_rows, H, p, scale,
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
            keep = dropout_keep(seed, offsets, p)
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


class BiasDropoutAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, bias: Tensor, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
        eps: float, dropout_p: float, training: bool,
    ) -> Tensor:
        hidden = x.shape[-1]
        x2d = x.detach().reshape(-1, hidden).contiguous()
        res2d = residual.detach().reshape(-1, hidden).contiguous()
        bias, w, b = (t.detach().contiguous() for t in (bias, ln_weight, ln_bias))
        rows = x2d.shape[0]
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, bias.dtype), residual.dtype)
        has_dropout = training and dropout_p > 0.0
        seed = draw_seed(x.device) if has_dropout else None
        y = torch.empty((rows, hidden), dtype=out_dtype, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, num_warps = row_config(hidden)
        if rows > 0:
            _bdal_fwd_kernel[(rows,)](
                x2d, bias, res2d, w, b, y, mean, rstd, seed, hidden, eps, dropout_p, dropout_scale(dropout_p),
                BLOCK=block, HAS_DROPOUT=has_dropout, num_warps=num_warps,
            )
        ctx.save_for_backward(x2d, bias, res2d, w, mean, rstd, seed)
        ctx.has_dropout = has_dropout
        ctx.dropout_p = dropout_p
        ctx.shapes = (x.shape, residual.shape, ln_bias.dtype)
        return y.view(*x.shape[:-1], hidden)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2d, bias, res2d, w, mean, rstd, seed = ctx.saved_tensors
        x_shape, res_shape, ln_bias_dtype = ctx.shapes
        rows, hidden = x2d.shape
        dy2d = dy.reshape(rows, hidden).contiguous()
        # One gradient tensor serves x and residual when there is no mask or cast between them.
        store_dx = ctx.has_dropout or x2d.dtype != res2d.dtype
        dres = torch.empty_like(res2d)
        dx = torch.empty_like(x2d) if store_dx else dres
        programs = partial_programs(rows, x2d.device)
        partials = torch.zeros((3, programs, hidden), dtype=torch.float32, device=x2d.device)
        block, num_warps = row_config(hidden)
        if rows > 0:
            _bdal_bwd_kernel[(programs,)](
                dy2d, x2d, bias, res2d, w, mean, rstd, seed, dres, dx, partials,
                rows, hidden, ctx.dropout_p, dropout_scale(ctx.dropout_p),
                BLOCK=block, HAS_DROPOUT=ctx.has_dropout, STORE_DX=store_dx, num_warps=num_warps,
            )
        dw, db, dbias = reduce_partials(partials)
        return (
            dx.view(x_shape), dbias.to(bias.dtype), dres.view(res_shape), dw.to(w.dtype),
            db.to(ln_bias_dtype), None, None, None,
        )


def bias_dropout_add_layernorm(
    x: Tensor,
    bias: Tensor,
    residual: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    dropout_p: float,
    training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual) over the last dim; see the module docstring."""
    check_dropout(dropout_p)
    tensors = (x, bias, residual, ln_weight, ln_bias)
    if (
        not kernels_available(x)
        or x.shape[-1] > MAX_HIDDEN
        or any(t.dtype not in DTYPES for t in tensors)
    ):
        return reference.bias_dropout_add_layernorm(x, bias, residual, ln_weight, ln_bias, eps, dropout_p, training)
    return BiasDropoutAddLayerNorm.apply(x, bias, residual, ln_weight, ln_bias, eps, dropout_p, training)


def aot_specs() -> list[AotSpec]:
    specs = []
    for block, num_warps, act, dt, tuned in aot_row_configs():
        tag = f"BLOCK={block},{dtype_tag(act, dt)}"
        fwd_sig = {
            "x_ptr": f"*{act}", "bias_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}",
            "y_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "seed_ptr": "*i64",
            "H": "i32", "eps": "fp32", "p": "fp32", "scale": "fp32", "BLOCK": "constexpr",
            "HAS_DROPOUT": "constexpr",
        }
        bwd_sig = {
            "dy_ptr": f"*{dt}", "x_ptr": f"*{act}", "bias_ptr": f"*{dt}", "res_ptr": f"*{dt}", "w_ptr": f"*{dt}",
            "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "seed_ptr": "*i64", "dres_ptr": f"*{dt}",
            "dx_ptr": f"*{act}", "partial_ptr": "*fp32", "n_rows": "i32", "H": "i32", "p": "fp32",
            "scale": "fp32", "BLOCK": "constexpr", "HAS_DROPOUT": "constexpr", "STORE_DX": "constexpr",
        }
        for dropout in (True, False):
            kind = "dropout" if dropout else "eval"
            # Without dropout the launcher passes seed_ptr=None, which Triton makes a constexpr.
            seed = {} if dropout else {"seed_ptr": "constexpr"}
            seed_value = {} if dropout else {"seed_ptr": None}
            specs.append(AotSpec(
                f"bdal_fwd[{tag},{kind}]", _bdal_fwd_kernel, {**fwd_sig, **seed},
                {"BLOCK": block, "HAS_DROPOUT": dropout, **seed_value}, num_warps=num_warps, tuned=tuned,
            ))
            specs.append(AotSpec(
                f"bdal_bwd[{tag},{kind}]", _bdal_bwd_kernel, {**bwd_sig, **seed},
                {"BLOCK": block, "HAS_DROPOUT": dropout, "STORE_DX": dropout or act != dt, **seed_value},
                num_warps=num_warps, tuned=tuned,
            ))
    return specs

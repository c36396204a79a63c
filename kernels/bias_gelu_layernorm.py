"""LayerNorm(gelu(x + bias)): the MLM prediction-head transform after its dense layer.

Forward, per row of H values (fp32 inside)::

    u = x + bias;  h = gelu(u)     # exact erf GELU, or the tanh approximation
    mean = sum(h) / H;  rstd = 1 / sqrt(sum((h - mean)^2) / H + eps)
    y = (h - mean) * rstd * gamma + beta

The forward stores y and (mean, rstd) per row; the backward reads x once more and
recomputes u, h and gelu'(u) rather than keeping h. Backward::

    dh = LayerNorm backward of dy (see ``layernorm_common``)
    dx = dh * gelu'(u);  dbias = sum_rows dx
    dgamma = sum_rows dy * x_hat;  dbeta = sum_rows dy
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
    check_approximate,
    dtype_tag,
    gelu,
    gelu_grad,
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
def _bgl_fwd_kernel(
    x_ptr, bias_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, H, eps,
    BLOCK: tl.constexpr, APPROX_TANH: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    offsets = row.to(tl.int64) * H + cols
    u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = gelu(u, APPROX_TANH)  # gelu(0) = 0: the masked lanes stay out of the sums
    y, mean, rstd = layernorm_row(h, cols, mask, H, eps, w_ptr, b_ptr)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _bgl_bwd_kernel(
    dy_ptr, x_ptr, bias_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, n_rows, H,
    BLOCK: tl.constexpr, APPROX_TANH: tl.constexpr,
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
    for row in range(g, n_rows, n_programs):
        offsets = tl.cast(row, tl.int64) * H + cols
        u = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + bias
        rstd = tl.load(rstd_ptr + row)
        x_hat = tl.where(mask, (gelu(u, APPROX_TANH) - tl.load(mean_ptr + row)) * rstd, 0.0)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        du = layernorm_row_grad(x_hat, dy, w, rstd, H) * gelu_grad(u, APPROX_TANH)
        du = tl.where(mask, du, 0.0)
        tl.store(dx_ptr + offsets, du.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
        dbias += du
    store_ln_partials(partial_ptr, g, n_programs, H, cols, mask, dw, db, dbias)


class BiasGeluLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float, approximate: str
    ) -> Tensor:
        hidden = x.shape[-1]
        x2d = x.detach().reshape(-1, hidden).contiguous()
        bias, w, b = (t.detach().contiguous() for t in (bias, ln_weight, ln_bias))
        rows = x2d.shape[0]
        approx_tanh = approximate == "tanh"
        y = torch.empty((rows, hidden), dtype=torch.promote_types(x.dtype, bias.dtype), device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, num_warps = row_config(hidden)
        if rows > 0:
            _bgl_fwd_kernel[(rows,)](
                x2d, bias, w, b, y, mean, rstd, hidden, eps, BLOCK=block, APPROX_TANH=approx_tanh,
                num_warps=num_warps,
            )
        ctx.save_for_backward(x2d, bias, w, mean, rstd)
        ctx.approx_tanh = approx_tanh
        ctx.x_shape = x.shape
        ctx.ln_bias_dtype = ln_bias.dtype
        return y.view(*x.shape[:-1], hidden)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x2d, bias, w, mean, rstd = ctx.saved_tensors
        rows, hidden = x2d.shape
        dy2d = dy.reshape(rows, hidden).contiguous()
        dx = torch.empty_like(x2d)
        programs = partial_programs(rows, x2d.device)
        partials = torch.zeros((3, programs, hidden), dtype=torch.float32, device=x2d.device)
        block, num_warps = row_config(hidden)
        if rows > 0:
            _bgl_bwd_kernel[(programs,)](
                dy2d, x2d, bias, w, mean, rstd, dx, partials, rows, hidden,
                BLOCK=block, APPROX_TANH=ctx.approx_tanh, num_warps=num_warps,
            )
        dw, db, dbias = reduce_partials(partials)
        return dx.view(ctx.x_shape), dbias.to(bias.dtype), dw.to(w.dtype), db.to(ctx.ln_bias_dtype), None, None


def bias_gelu_layernorm(
    x: Tensor, bias: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float, approximate: str = "none"
) -> Tensor:
    """LayerNorm(gelu(x + bias)) over the last dim; see the module docstring."""
    check_approximate(approximate)
    if (
        not kernels_available(x)
        or x.shape[-1] > MAX_HIDDEN
        or any(t.dtype not in DTYPES for t in (x, bias, ln_weight, ln_bias))
    ):
        return reference.bias_gelu_layernorm(x, bias, ln_weight, ln_bias, eps, approximate)
    return BiasGeluLayerNorm.apply(x, bias, ln_weight, ln_bias, eps, approximate)


def aot_specs() -> list[AotSpec]:
    specs = []
    for block, num_warps, act, dt, tuned in aot_row_configs():
        constants = {"BLOCK": block, "APPROX_TANH": False}
        fwd_sig = {
            "x_ptr": f"*{act}", "bias_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}",
            "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "H": "i32", "eps": "fp32",
            "BLOCK": "constexpr", "APPROX_TANH": "constexpr",
        }
        bwd_sig = {
            "dy_ptr": f"*{dt}", "x_ptr": f"*{act}", "bias_ptr": f"*{dt}", "w_ptr": f"*{dt}",
            "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": f"*{act}", "partial_ptr": "*fp32",
            "n_rows": "i32", "H": "i32", "BLOCK": "constexpr", "APPROX_TANH": "constexpr",
        }
        tag = f"BLOCK={block},{dtype_tag(act, dt)}"
        specs.append(AotSpec(f"bgl_fwd[{tag}]", _bgl_fwd_kernel, fwd_sig, constants, num_warps=num_warps,
                             tuned=tuned))
        specs.append(AotSpec(f"bgl_bwd[{tag}]", _bgl_bwd_kernel, bwd_sig, constants, num_warps=num_warps,
                             tuned=tuned))
    return specs

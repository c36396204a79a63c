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

from bertfast.common.library import kernel_op, wrap_triton
from bertfast.kernels.aot import AotSpec, meta, record, spec
from bertfast.kernels.layernorm_common import (
    MAX_HIDDEN,
    aot_rows,
    bias_or_zeros,
    gelu,
    gelu_grad,
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


def _out_dtype(x: Tensor, bias: Tensor | None) -> torch.dtype:
    return x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)


def _forward_fake(x, bias, ln_weight, ln_bias, eps, approximate):
    rows = x.numel() // x.shape[-1]
    y = x.new_empty(x.shape, dtype=_out_dtype(x, bias))
    return y, x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _launch_forward(
    x: Tensor, bias: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float, approximate: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd)."""
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden).contiguous()
    rows = x2d.shape[0]
    y, mean, rstd = row_outputs(rows, hidden, _out_dtype(x, bias), x.device)
    block, num_warps = row_config(hidden)
    wrap_triton(_bgl_fwd_kernel)[(rows,)](
        x2d, bias_or_zeros(bias, x), ln_weight.contiguous(), ln_bias.contiguous(), y, mean, rstd, hidden, eps,
        BLOCK=block, APPROX_TANH=approximate == "tanh", num_warps=num_warps,
    )
    return y.view(x.shape), mean, rstd


_forward_op = kernel_op("bias_gelu_layernorm_triton", _forward_fake)(_launch_forward)


def _backward_fake(dy, x, bias, ln_weight, mean, rstd, approximate):
    hidden = x.shape[-1]
    dbias = x.new_empty(hidden, dtype=x.dtype if bias is None else bias.dtype)
    w = ln_weight.new_empty(hidden, dtype=torch.float32)
    return torch.empty_like(x), dbias, w, torch.empty_like(w)


def _launch_backward(
    dy: Tensor, x: Tensor, bias: Tensor | None, ln_weight: Tensor, mean: Tensor, rstd: Tensor, approximate: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dbias, fp32 dgamma, fp32 dbeta)."""
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden).contiguous()
    rows = x2d.shape[0]
    b = bias_or_zeros(bias, x)
    dx = torch.empty_like(x2d)
    programs = partial_programs(rows, x.device)
    partials = partial_sums(3, programs, hidden, x.device)
    block, num_warps = row_config(hidden)
    wrap_triton(_bgl_bwd_kernel)[(programs,)](
        dy.reshape(-1, hidden).contiguous(), x2d, b, ln_weight.contiguous(), mean, rstd, dx, partials, rows, hidden,
        BLOCK=block, APPROX_TANH=approximate == "tanh", num_warps=num_warps,
    )
    dw, db, dbias = (reduce_partials(sums) for sums in partials)  # separate tensors: op outputs may not alias
    return dx.view(x.shape), dbias.to(b.dtype), dw, db


_backward_op = kernel_op("bias_gelu_layernorm_triton_backward", _backward_fake)(_launch_backward)


def _setup_context(ctx, inputs, output) -> None:
    x, bias, ln_weight, ln_bias, _, ctx.approximate = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, bias, ln_weight, mean, rstd)
    ctx.ln_bias_dtype = ln_bias.dtype


def _backward(ctx, dy: Tensor, _dmean, _drstd) -> tuple[Tensor | None, ...]:
    x, bias, ln_weight, mean, rstd = ctx.saved_tensors
    dx, dbias, dw, db = _backward_op(dy, x, bias, ln_weight, mean, rstd, ctx.approximate)
    return dx, dbias if bias is not None else None, dw.to(ln_weight.dtype), db.to(ctx.ln_bias_dtype), None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def supports(*tensors: Tensor | None) -> bool:
    """CUDA (or the interpreter), fp32/bf16/fp16, rows of at most MAX_HIDDEN."""
    return kernels_run(*tensors) and tensors[0].shape[-1] <= MAX_HIDDEN


def bias_gelu_layernorm(
    x: Tensor, bias: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float, approximate: str = "none"
) -> Tensor:
    """LayerNorm(gelu(x + bias)) over the last dim; see the module docstring."""
    return _forward_op(x, bias, ln_weight, ln_bias, eps, approximate)[0]


def aot_specs() -> list[AotSpec]:
    specs = []
    for hidden, act, dt, tuned in aot_rows():
        tag = row_tag(hidden, act, dt)
        x, bias, w, b = meta(4, hidden, dtype=act), *(meta(hidden, dtype=dt) for _ in range(3))
        (fwd,) = record(_launch_forward, x, bias, w, b, 1e-12, "none")
        (bwd,) = record(_launch_backward, meta(4, hidden, dtype=dt), x, bias, w, meta(4), meta(4), "none")
        specs += [spec(f"bgl_fwd[{tag}]", fwd, tuned=tuned), spec(f"bgl_bwd[{tag}]", bwd, tuned=tuned)]
    return specs

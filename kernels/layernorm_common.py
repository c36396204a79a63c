"""Pieces shared by the LayerNorm-family kernels.

* :func:`row_config`: one row of ``hidden`` values per program, BLOCK = next power of two.
* :func:`partial_programs` / :func:`reduce_partials`: column sums over all rows (dgamma, dbeta,
  dbias) without atomics. The backward kernels run a bounded number of programs that each
  walk a strided set of rows and keep their own fp32 partial sums in registers; a second,
  small reduction adds up the ``(programs, hidden)`` partials. Deterministic for a device.
* ``gelu`` / ``gelu_grad``, ``dropout_keep`` (the counter-hash mask of every backend),
  ``layernorm_row`` / ``layernorm_row_grad`` and
  ``store_ln_partials``: @triton.jit helpers inlined by the kernels.
* LayerNorm backward of one row, given x_hat = (h - mean) * rstd and dy::

      wdy = gamma * dy
      dh  = rstd * (wdy - mean(wdy) - x_hat * mean(x_hat * wdy))
      dgamma += dy * x_hat;  dbeta += dy
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.common.library import TRITON_INTERPRETED

# Larger rows would not fit one program's registers: the dispatcher runs the reference beyond it.
MAX_HIDDEN = 4096
# The hidden sizes that the launchers are tuned for (BERT base and large).
TUNED_HIDDEN = (768, 1024)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)


def row_config(hidden: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a program that holds one row: ~8 values per thread."""
    block = triton.next_power_of_2(max(hidden, 1))
    return block, min(16, max(1, block // 256))


def aot_rows() -> list[tuple[int, torch.dtype, torch.dtype, bool]]:
    """(hidden, activation dtype, parameter dtype, tuned) that the AOT check launches the row kernels with.

    One hidden size per launch configuration that the tuned sizes reach, in every dtype and as autocast
    runs them (bf16 activations from a matmul with fp32 parameters, residual and outputs), and the
    widest row in fp32.
    """
    tuned = {row_config(h): h for h in TUNED_HIDDEN}.values()
    rows = [(hidden, dtype, dtype, True) for hidden in tuned for dtype in DTYPES]
    rows += [(hidden, torch.bfloat16, torch.float32, True) for hidden in tuned]
    return rows + [(MAX_HIDDEN, torch.float32, torch.float32, False)]


def row_tag(hidden: int, act: torch.dtype, param: torch.dtype) -> str:
    """The configuration column of the AOT check for a row kernel: its BLOCK and dtypes."""
    return f"BLOCK={row_config(hidden)[0]},{dtype_tag(DTYPES[act], DTYPES[param])}"


def dtype_tag(act: str, param: str) -> str:
    return act if act == param else f"{act}+{param}"


def partial_programs(n_items, device: torch.device, share: int = 1):
    """How many programs (each with its own partial sums) walk ``n_items`` rows or row blocks.

    ``share`` divides the budget when each row-program group also spans several column tiles. At
    least one program, which writes zero partials when there are no rows. ``n_items`` may be a
    symbolic size under ``torch.compile``: sym_min / sym_max keep it symbolic instead of guarding on it.
    """
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).multi_processor_count * 4
    else:
        budget = 4  # the interpreter runs programs one after another: few partials, fewer stores
    return torch.sym_max(1, torch.sym_min(n_items, budget // share))


def reduce_partials(partials: Tensor) -> Tensor:
    """(..., programs, hidden) fp32 partial sums -> (..., hidden): the second, small reduction."""
    return partials.sum(dim=-2)


def kernels_run(*tensors: Tensor | None) -> bool:
    """Whether the kernels take these tensors: CUDA (CPU only in the interpreter) and fp32/bf16/fp16."""
    present = [t for t in tensors if t is not None]
    return all(
        (t.device.type == "cuda" or (TRITON_INTERPRETED and t.device.type == "cpu")) and t.dtype in DTYPES
        for t in present
    )


def row_outputs(rows, hidden: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The forward outputs of a one-row-per-program kernel: y (rows, hidden) and fp32 mean, rstd (rows,)."""
    y = torch.empty((rows, hidden), dtype=dtype, device=device)
    mean = torch.empty(rows, dtype=torch.float32, device=device)
    return y, mean, torch.empty_like(mean)


def bias_or_zeros(bias: Tensor | None, x: Tensor) -> Tensor:
    """The bias a kernel reads: ``bias``, or zeros in x's dtype when the op has none."""
    return torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device) if bias is None else bias.contiguous()


def partial_sums(n_sums: int, programs, hidden: int, device: torch.device) -> Tensor:
    """The (n_sums, programs, hidden) fp32 buffer that backward programs store their partial sums in."""
    return torch.zeros((n_sums, programs, hidden), dtype=torch.float32, device=device)


@triton.jit
def gelu(u, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        z = _SQRT_2_OVER_PI * (u + _GELU_TANH_C * u * u * u)
        t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # tanh(z), saturating cleanly at +-1
        return 0.5 * u * (1.0 + t)
    return 0.5 * u * (1.0 + tl.math.erf(u * _SQRT1_2))


@triton.jit
def gelu_grad(u, APPROX_TANH: tl.constexpr):
    """d gelu(u) / du."""
    if APPROX_TANH:
        z = _SQRT_2_OVER_PI * (u + _GELU_TANH_C * u * u * u)
        t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
        dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * u * u)
        return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * dz
    return 0.5 * (1.0 + tl.math.erf(u * _SQRT1_2)) + u * _INV_SQRT_2PI * tl.exp(-0.5 * u * u)


@triton.jit
def mix32(x):
    """lowbias32, on uint32 values (wrapping products, logical shifts)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def dropout_key(seed):
    """(k0, k1): the two 32-bit words that the mask mixes in, from the int64 seed."""
    return mix32(seed.to(tl.uint32) ^ 0x9E3779B9), mix32((seed >> 32).to(tl.uint32) ^ 0x7F4A7C15)


@triton.jit
def dropout_keep_keyed(k0, k1, row, cols, threshold):
    """:func:`dropout_keep` with the key already mixed (once per program, outside the loops)."""
    bits = mix32(mix32(tl.cast(cols, tl.uint32) ^ k0) + (tl.cast(row, tl.uint32) ^ k1))
    return (bits >> 1).to(tl.int32) >= threshold


@triton.jit
def dropout_keep(seed, row, cols, threshold):
    """Whether elements (row, cols) survive dropout: the rule of ``bertfast.common.dropout.keep_mask`` (and of
    the native kernel), bit for bit. ``row`` and ``cols`` broadcast against each other; ``threshold`` is
    ``bertfast.common.dropout.threshold(p)``."""
    k0, k1 = dropout_key(seed)
    return dropout_keep_keyed(k0, k1, row, cols, threshold)


@triton.jit
def layernorm_row(h, cols, mask, H, eps, w_ptr, b_ptr):
    """(y, mean, rstd) of one fp32 row ``h`` whose masked lanes hold 0: y = (h - mean) * rstd * gamma + beta."""
    mean = tl.sum(h, axis=0) / H
    d = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return d * rstd * w + b, mean, rstd


@triton.jit
def layernorm_row_grad(x_hat, dy, w, rstd, H):
    """dh of one row (the formula in the module docstring), from x_hat, dy, gamma and rstd."""
    wdy = w * dy
    c1 = tl.sum(x_hat * wdy, axis=0) / H
    c2 = tl.sum(wdy, axis=0) / H
    return (wdy - (x_hat * c1 + c2)) * rstd


@triton.jit
def store_ln_partials(partial_ptr, g, n_programs, H, cols, mask, dw, db, dbias):
    """Program ``g``'s fp32 partial sums of dgamma, dbeta and dbias into a (3, programs, H) buffer."""
    stride = n_programs.to(tl.int64) * H
    out = partial_ptr + g.to(tl.int64) * H + cols
    tl.store(out, dw, mask=mask)
    tl.store(out + stride, db, mask=mask)
    tl.store(out + 2 * stride, dbias, mask=mask)

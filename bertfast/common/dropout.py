"""The dropout seed and keep rule shared by every backend (the policy is described in ``bertfast.ops``)."""

from __future__ import annotations

import torch
from torch import Tensor

SEED_BITS = 62  # seeds are drawn in [0, 2**62): any backend's integer type holds them


def draw_seed(device: torch.device) -> Tensor:
    """One dropout seed, a 0-dim int64 tensor drawn from torch's generator of ``device`` and kept there.

    Called in the (traced) op wrappers: ``torch.compile`` records the draw, checkpointing replays it
    (it restores the generator's state), and no host sync happens, so CUDA graphs can capture it.
    """
    return torch.randint(0, 2**SEED_BITS, (), device=device, dtype=torch.int64)


def check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def scale(p: float) -> float:
    """What kept values are multiplied by; p == 1 drops everything (like F.dropout)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def threshold(p: float) -> int:
    """What an element's 31-bit hash must reach to be kept: round(p * 2**31), at most 2**31 - 1.

    (At p == 1 the scale is 0, so the one hash value in 2**31 that would be "kept" still gives 0.)
    """
    return min(round(p * 2**31), 2**31 - 1)


_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 on int32 tensors holding uint32 bits (two's-complement products wrap as uint32 ones do;
    the right shifts are made logical by masking)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - 2**32)  # the uint32 constant, as an int32
    return x ^ ((x >> 16) & 0xFFFF)


def _int32(x: Tensor) -> Tensor:
    """The low 32 bits of an int64 tensor, as int32."""
    low = x & _MASK32
    return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)


def keep_mask(seed: Tensor, rows: Tensor, n_cols: int, p: float) -> Tensor:
    """(len(rows), n_cols) bool: which elements (row, col) dropout keeps, as every backend decides it.

    keep = (mix32(mix32(col ^ k0) + (row ^ k1)) >> 1) >= threshold(p), with k0 = mix32(lo32(seed) ^
    0x9e3779b9) and k1 = mix32(hi32(seed) ^ 0x7f4a7c15), all mod 2**32 (``csrc/dropout.cpp``).
    """
    k0 = _mix32(_int32(seed) ^ _int32(torch.tensor(0x9E3779B9, device=seed.device)))
    k1 = _mix32(_int32(seed >> 32) ^ 0x7F4A7C15)
    cols = torch.arange(n_cols, device=seed.device, dtype=torch.int32)
    bits = _mix32(_mix32(cols ^ k0)[None, :] + (_int32(rows) ^ k1)[:, None])
    return ((bits >> 1) & 0x7FFFFFFF) >= threshold(p)


def apply(x: Tensor, seed: Tensor, p: float, rows: Tensor | None = None) -> Tensor:
    """Dropout of ``x`` (..., cols) with the shared keep rule: row i of x.reshape(-1, cols) is ``rows[i]``
    (default: i); kept values are scaled by 1 / (1 - p). Differentiable (the mask is a constant)."""
    n_cols = x.shape[-1]
    flat = x.reshape(-1, n_cols)
    if rows is None:
        rows = torch.arange(flat.shape[0], device=x.device)
    keep = keep_mask(seed, rows, n_cols, p)
    return (flat * (keep * scale(p)).to(x.dtype)).view(x.shape)

"""Ops backed by the C++ CPU kernels in ``bertfast._C``.

The kernels take contiguous float32 buffers; anything else (other dtypes, the
tanh GELU) runs the reference instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bertfast import _C
from bertfast.ops import reference


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor) -> Tensor:
        x2d = x.detach().reshape(-1, x.shape[-1]).contiguous()
        b = bias.detach().contiguous()
        ctx.save_for_backward(x2d, b)
        ctx.input_shape = x.shape
        y = _C.bias_gelu_forward(x2d.numpy(), b.numpy())
        return torch.from_numpy(y).view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor]:
        x2d, b = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx, db = _C.bias_gelu_backward(dy2d.numpy(), x2d.numpy(), b.numpy())
        return torch.from_numpy(dx).view(ctx.input_shape), torch.from_numpy(db)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x + bias) with the native kernel for float32 CPU tensors and the exact GELU."""
    if approximate != "none" or x.dtype != torch.float32 or bias.dtype != torch.float32 or x.is_cuda:
        return reference.bias_gelu(x, bias, approximate)
    return _BiasGelu.apply(x, bias)

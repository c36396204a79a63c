"""The native CPU rotary embeddings and gated GELU (csrc/rotary.cpp, csrc/geglu.cpp) against the reference:
outputs and gradients, float32 and bfloat16, odd shapes, no tokens, positions past any table."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.ops import reference

pytest.importorskip("bertfast.ops.native")


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)


def outputs_and_grads(fn, inputs: list[torch.Tensor], args: tuple, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = fn(*inputs, *args)
    return (out, *torch.autograd.grad(out, inputs, dy))


def compare(fn_name: str, x: torch.Tensor, args: tuple) -> None:
    """The native op, the reference in x's dtype and the reference in float32, outputs and gradients."""
    with ops.use_backend("native"):
        assert ops.implementation(fn_name, x, *[a for a in args if isinstance(a, torch.Tensor)][1:])[0] == "native"
        probe = getattr(ops, fn_name)(x.detach(), *args)
    dy = torch.randn(probe.shape, dtype=torch.float64).to(x.dtype)
    with ops.use_backend("native"):
        actual = outputs_and_grads(getattr(ops, fn_name), [x], args, dy)
    same_dtype = outputs_and_grads(getattr(reference, fn_name), [x], args, dy)
    x32 = x.detach().float().requires_grad_()
    fp32 = outputs_and_grads(getattr(reference, fn_name), [x32], args, dy.float())
    assert_matches_reference(("out", "dx"), actual, tuple(t.to(x.dtype) for t in fp32), same_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,head_dim", [(13, 4, 16), (1, 1, 2), (0, 3, 8), (37, 3, 64)])
def test_rotary_matches_the_reference(tokens, heads, head_dim, dtype, one_thread):
    qkv = torch.randn(tokens, 3, heads, head_dim, dtype=torch.float64).to(dtype).requires_grad_()
    positions = torch.randint(0, 9000, (tokens,))  # past any position table: rotary has none
    compare("rotary", qkv, (positions, inv_freq(head_dim, 160000.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 48), (1, 2), (0, 8), (2, 5, 70)])
def test_geglu_matches_the_reference(shape, dtype, one_thread):
    x = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).requires_grad_()
    compare("geglu", x, ())


def test_rotary_gradient_turns_back():
    """The gradient of a rotation is the rotation the other way: rotating dy back gives dqkv."""
    qkv = torch.randn(5, 3, 2, 8, requires_grad=True)
    positions, freq = torch.arange(5), inv_freq(8)
    dy = torch.randn(5, 3, 2, 8)
    (dqkv,) = torch.autograd.grad(ops.rotary(qkv, positions, freq), qkv, dy)
    torch.testing.assert_close(torch.ops.bertfast.rotary(dy, positions, freq, True), dqkv)
    torch.testing.assert_close(dqkv[:, 2], dy[:, 2])  # v passes through


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="even last dimension"):
        torch.ops.bertfast.geglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="positions must be"):
        torch.ops.bertfast.rotary(torch.randn(4, 3, 2, 8), torch.arange(3), inv_freq(8))
    with pytest.raises(ValueError, match="inv_freq must be"):
        torch.ops.bertfast.rotary(torch.randn(4, 3, 2, 8), torch.arange(4), inv_freq(6))

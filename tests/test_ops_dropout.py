"""The dropout policy of ``bertfast.ops``: seeds from the device's generator, one mask rule for every backend,
and masks that activation checkpointing replays."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from bertfast import ops
from bertfast.common import dropout
from bertfast.common.library import TRITON_INTERPRETED

BACKENDS = ["torch", "native"] + (["triton"] if TRITON_INTERPRETED else [])
HIDDEN, HEADS = 32, 2


def make_layer():
    torch.manual_seed(0)
    lengths = [3, 0, 7, 5]
    cu_seqlens = torch.tensor([0, 3, 3, 10, 15], dtype=torch.int32)
    total = sum(lengths)
    ids = torch.randint(1, 20, (total,))
    positions = torch.cat([torch.arange(n) for n in lengths])
    params = [torch.randn(20, HIDDEN), torch.randn(8, HIDDEN), torch.randn(2, HIDDEN), 1 + 0.1 * torch.randn(HIDDEN),
              0.1 * torch.randn(HIDDEN), 0.2 * torch.randn(3 * HIDDEN, HIDDEN), 0.2 * torch.randn(HIDDEN, HIDDEN),
              0.1 * torch.randn(HIDDEN)]
    return ids, positions, cu_seqlens, [p.requires_grad_() for p in params]


def layer(ids, positions, cu_seqlens, params, p=0.3):
    """Embeddings, attention, bias + dropout + residual + LayerNorm: every op that drops."""
    word, pos, types, ln_w, ln_b, w_qkv, w_o, b_o = params
    h = ops.embeddings(ids, positions, torch.zeros_like(ids), word, pos, types, ln_w, ln_b, 1e-12, p, True)
    qkv = (h @ w_qkv.T).view(-1, 3, HEADS, HIDDEN // HEADS)
    context = ops.attention(qkv, cu_seqlens, 8, p, True).reshape(-1, HIDDEN)  # 8: a bound above the longest (7)
    return ops.bias_dropout_add_layernorm(context @ w_o.T, b_o, h, ln_w, ln_b, 1e-12, p, True)


def step(backend, run_layer, seed):
    ids, positions, cu_seqlens, params = make_layer()
    with ops.use_backend(backend):
        torch.manual_seed(seed)
        out = run_layer(ids, positions, cu_seqlens, params)
        grads = torch.autograd.grad(out, params, torch.linspace(-1, 1, out.numel()).view(out.shape))
    return out.detach(), grads


def test_seeds_are_device_tensors_from_the_generator():
    torch.manual_seed(11)
    first = dropout.draw_seed(torch.device("cpu"))
    assert first.shape == () and first.dtype == torch.int64 and 0 <= int(first) < 2**dropout.SEED_BITS
    torch.manual_seed(11)
    assert torch.equal(dropout.draw_seed(torch.device("cpu")), first)
    assert not torch.equal(dropout.draw_seed(torch.device("cpu")), first)  # each draw advances the generator


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_shared_mask_keeps_one_minus_p(p):
    keep = dropout.keep_mask(torch.tensor(5), torch.arange(512), 512, p)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * (p * (1 - p) / n) ** 0.5
    assert dropout.keep_mask(torch.tensor(5), torch.arange(4), 8, 0.0).all()


def test_every_backend_keeps_the_same_elements_for_a_seed(one_thread):
    """One seed, one mask: the outputs and gradients of the three backends agree to rounding."""
    reference_out, reference_grads = step("torch", layer, seed=7)
    _, other_grads = step("torch", layer, seed=8)
    assert not torch.allclose(reference_grads[0], other_grads[0])  # the seed matters
    for backend in BACKENDS[1:]:
        out, grads = step(backend, layer, seed=7)
        torch.testing.assert_close(out, reference_out, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpointed_layer_replays_its_masks(backend, one_thread):
    plain_out, plain_grads = step(backend, layer, seed=3)
    out, grads = step(backend, lambda *args: checkpoint(layer, *args, use_reentrant=False), seed=3)
    assert torch.equal(out, plain_out)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

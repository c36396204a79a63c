"""Fused packed attention (Triton; the interpreter on CPU) against the reference.

Interpreter runs are slow, so the cases are few heads and small batches chosen to cover:
several query/key blocks, partial blocks, length-1 and empty sequences, every dQ mode
(stored from a single key block, recomputed, atomic), head dims 32/64/128 and a padded one.
"""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_relative_rule

from bertfast import ops
from bertfast.common.dropout import draw_seed
from bertfast.kernels import attention as attn
from bertfast.ops import reference


def make_qkv(lengths: list[int], heads: int, head_dim: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim).to(dtype).requires_grad_()
    return qkv, cu_seqlens, max(lengths)


def masked_reference(qkv, cu_seqlens, keep=None, dropout_p=0.0, scale=None):
    """Per-sequence softmax(scale Q K^T) [* keep / (1 - p)] V, in the dtype of qkv."""
    scale = scale if scale is not None else 1.0 / math.sqrt(qkv.shape[-1])
    outs = []
    for b in range(cu_seqlens.numel() - 1):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        q, k, v = qkv[start:end].permute(1, 2, 0, 3)  # each (heads, L, head_dim)
        probs = torch.softmax(scale * q @ k.transpose(1, 2), dim=-1)
        if keep is not None:
            probs = probs * keep[b, :, : end - start, : end - start] / (1.0 - dropout_p)
        outs.append((probs @ v).transpose(0, 1))
    return torch.cat(outs)


def forward_backward(fn, qkv, grad_out=None, **kwargs):
    out = fn(qkv, **kwargs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    return out.detach(), grad, grad_out


def assert_close_fp32(actual, expected, name):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{name}: {m}")


def assert_outputs_and_grads(out, grad, ref_out, ref_grad):
    assert_close_fp32(out, ref_out, "output")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close_fp32(grad[:, i], ref_grad[:, i], name)


CASES = {
    # name: (lengths, heads, head_dim)
    "ragged": ([1, 2, 17, 64, 128, 200], 2, 64),
    "one_sequence": ([77], 3, 32),
    "many_short": ([3, 1, 5, 2, 8, 1, 7, 4, 6, 2, 1, 9, 3, 5, 12, 1], 2, 32),
    "empty_sequences": ([0, 5, 0, 33, 0], 2, 64),
    "head_dim_128": ([100, 9], 1, 128),  # 100 > BLOCK_N1 = 64 at head_dim 128: dQ is not a single block
    "head_dim_48": ([30, 7], 2, 48),  # padded to a 64-wide tile
}


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case, deterministic):
    lengths, heads, head_dim = CASES[case]
    qkv, cu_seqlens, max_seqlen = make_qkv(lengths, heads, head_dim)
    out, grad, grad_out = forward_backward(attn.flash_attention, qkv, cu_seqlens=cu_seqlens,
                                           max_seqlen=max_seqlen, deterministic=deterministic)
    ref_out, ref_grad, _ = forward_backward(reference.attention, qkv, grad_out, cu_seqlens=cu_seqlens,
                                            max_seqlen=max_seqlen)
    assert_outputs_and_grads(out, grad, ref_out, ref_grad)


def test_log_sum_exp_and_softmax_scale():
    qkv, cu_seqlens, max_seqlen = make_qkv([5, 70, 1], 2, 32)
    scale = 0.3
    fwd_cfg, _ = attn.select_configs(qkv.device, 32, max_seqlen)
    out, lse = attn._forward(qkv.detach(), cu_seqlens, max_seqlen, scale, 0.0, None, fwd_cfg)
    assert lse.shape == (2, qkv.shape[0]) and lse.dtype == torch.float32
    for b in range(3):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        q, k, _ = qkv.detach()[start:end].permute(1, 2, 0, 3)
        expected = torch.logsumexp(scale * q @ k.transpose(1, 2), dim=-1)
        torch.testing.assert_close(lse[:, start:end], expected, rtol=1e-5, atol=1e-5)
    ref = reference.attention(qkv.detach(), cu_seqlens, max_seqlen, softmax_scale=scale)
    assert_close_fp32(out, ref, "output")


def test_fp16_relative_rule():
    qkv16, cu_seqlens, max_seqlen = make_qkv([1, 17, 64, 150], 2, 64, torch.float16)
    qkv32 = qkv16.detach().float().requires_grad_()
    out, grad, grad_out = forward_backward(attn.flash_attention, qkv16, cu_seqlens=cu_seqlens,
                                           max_seqlen=max_seqlen)
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    ref16, ref_grad16, _ = forward_backward(reference.attention, qkv16, grad_out, **kwargs)
    ref32, ref_grad32, _ = forward_backward(reference.attention, qkv32, grad_out.float(), **kwargs)
    assert out.dtype == grad.dtype == torch.float16
    assert_relative_rule(out, ref32, ref16, atol=1e-3)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_relative_rule(grad[:, i], ref_grad32[:, i], ref_grad16[:, i], atol=1e-3, name=name)


@pytest.mark.parametrize("lengths,deterministic", [([3, 64, 150], True), ([3, 64, 150], False), ([5, 40, 100], True)],
                         ids=["recompute", "atomic", "store"])
def test_dropout_matches_masked_reference(lengths, deterministic):
    p, seed = 0.25, torch.tensor(1234)
    qkv, cu_seqlens, max_seqlen = make_qkv(lengths, 2, 32)
    out, grad, grad_out = forward_backward(attn.flash_attention, qkv, cu_seqlens=cu_seqlens,
                                           max_seqlen=max_seqlen, dropout_p=p, seed=seed,
                                           deterministic=deterministic)
    keep = attn.dropout_keep_mask(seed, cu_seqlens, 2, max_seqlen, p)
    ref_out, ref_grad, _ = forward_backward(masked_reference, qkv, grad_out, cu_seqlens=cu_seqlens,
                                            keep=keep, dropout_p=p)
    assert_outputs_and_grads(out, grad, ref_out, ref_grad)
    # Without the mask the result is a different one: the kernel did drop something.
    assert not torch.allclose(out, reference.attention(qkv.detach(), cu_seqlens, max_seqlen), atol=1e-3)


def test_dropout_same_seed_identical_and_seeded_by_torch():
    qkv, cu_seqlens, max_seqlen = make_qkv([9, 40], 2, 32)

    def run(seed_or_none):
        if seed_or_none is None:
            torch.manual_seed(7)
            return forward_backward(attn.attention, qkv, torch.ones(qkv.shape[0], 2, 32), cu_seqlens=cu_seqlens,
                                    max_seqlen=max_seqlen, dropout_p=0.3, training=True)[:2]
        return forward_backward(attn.flash_attention, qkv, torch.ones(qkv.shape[0], 2, 32),
                                cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=0.3,
                                seed=seed_or_none)[:2]

    first, again, other = run(torch.tensor(11)), run(torch.tensor(11)), run(torch.tensor(12))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    # Through the op signature the seed comes from torch's generator: manual_seed reproduces it.
    seeded, seeded_again = run(None), run(None)
    assert all(torch.equal(a, b) for a, b in zip(seeded, seeded_again, strict=True))
    torch.manual_seed(7)
    assert torch.equal(seeded[0], run(draw_seed(qkv.device))[0])
    # Evaluation mode ignores dropout_p.
    eval_out = attn.attention(qkv, cu_seqlens, max_seqlen, dropout_p=0.3, training=False)
    assert_close_fp32(eval_out.detach(), reference.attention(qkv.detach(), cu_seqlens, max_seqlen), "eval")


def test_dropout_keep_fraction():
    p = 0.1
    _, cu_seqlens, max_seqlen = make_qkv([200, 120, 0], 2, 16)
    keep = attn.dropout_keep_mask(torch.tensor(99), cu_seqlens, 2, max_seqlen, p)
    assert keep.shape == (3, 2, 200, 200)
    inside = torch.zeros_like(keep)
    inside[0] = True
    inside[1, :, :120, :120] = True
    assert not keep[~inside].any(), "keep mask set outside a sequence"
    n = int(inside.sum())
    kept = keep[inside].float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma, f"kept fraction {kept:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Heads and sequences draw different masks.
    assert not torch.equal(keep[0, 0, :120, :120], keep[0, 1, :120, :120])
    assert not torch.equal(keep[0, 0, :120, :120], keep[1, 0, :120, :120])


def test_padded_attention_matches_reference():
    batch, seqlen, heads, head_dim = 3, 40, 2, 32
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, requires_grad=True) for _ in range(3))
    mask = torch.zeros(batch, seqlen, dtype=torch.bool)
    mask[0] = True
    mask[1, :13] = True
    mask[1, 20] = True  # a hole: only the kept tokens attend, wherever they sit
    # row 2 is all padding
    with ops.use_backend("triton"):
        out = ops.padded_attention(q, k, v, mask)
    with ops.use_backend("torch"):
        ref = ops.padded_attention(q, k, v, mask)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert out.shape == (batch, seqlen, heads, head_dim)
    assert not out[~mask].any(), "padded query rows must be zeros"
    assert_close_fp32(out.detach(), ref.detach(), "output")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close_fp32(g, r, name)


def test_ops_route_to_the_kernels():
    qkv, cu_seqlens, max_seqlen = make_qkv([6, 20], 2, 32)
    q, k, v = (torch.randn(2, 8, 2, 32) for _ in range(3))
    with ops.use_backend("triton"):
        assert ops.implementation("attention", qkv) == ("triton", attn.attention)
        assert ops.implementation("attention", qkv.detach().double()) == ("torch", reference.attention)
        out = ops.attention(qkv, cu_seqlens, max_seqlen)
        padded = ops.padded_attention(q, k, v, torch.ones(2, 8, dtype=torch.bool))
    assert_close_fp32(out.detach(), attn.flash_attention(qkv, cu_seqlens, max_seqlen).detach(), "ops output")
    packed = torch.stack([q, k, v], dim=2).reshape(16, 3, 2, 32)
    direct = attn.flash_attention(packed, torch.tensor([0, 8, 16], dtype=torch.int32), 8).view(2, 8, 2, 32)
    assert_close_fp32(padded, direct, "padded ops output")


def test_empty_batch_and_unsupported_inputs():
    empty = torch.zeros(0, 3, 2, 32)
    assert attn.attention(empty, torch.zeros(1, dtype=torch.int32), 0).shape == (0, 2, 32)
    assert attn.attention(empty, torch.zeros(3, dtype=torch.int32), 16).shape == (0, 2, 32)
    # Head dims above 128: the dispatcher runs the reference, and the kernels' entry point refuses them.
    qkv, cu_seqlens, max_seqlen = make_qkv([4, 3], 1, 256)
    with ops.use_backend("triton"):
        assert ops.implementation("attention", qkv)[0] == "torch"
        out = ops.attention(qkv, cu_seqlens, max_seqlen)
    assert torch.equal(out, reference.attention(qkv, cu_seqlens, max_seqlen))
    with pytest.raises(ValueError, match="head dim 256"):
        attn.attention(qkv, cu_seqlens, max_seqlen)


@pytest.mark.parametrize("bound", [0, 5, 131])
def test_max_seqlen_is_an_upper_bound(bound):
    """Any bound at least the longest sequence gives the same result, empty sequences included."""
    qkv, cu_seqlens, max_seqlen = make_qkv([3, 0, 7, 0], 2, 32)
    bound += max_seqlen
    out, grad, grad_out = forward_backward(attn.flash_attention, qkv, cu_seqlens=cu_seqlens, max_seqlen=bound)
    ref_out, ref_grad, _ = forward_backward(reference.attention, qkv, grad_out, cu_seqlens=cu_seqlens,
                                            max_seqlen=max_seqlen)
    assert_outputs_and_grads(out, grad, ref_out, ref_grad)


def test_aot_specs_cover_every_selectable_config():
    names = {spec.name for spec in attn.aot_specs()}
    for table_name, table in attn.CONFIGS.items():
        for (block_d, short), (fwd, unbiased_bwd) in table.items():
            for dtype in ("fp16", "bf16"):
                for drop in ("", ",dropout", ",bias", ",dropout,bias"):
                    tag = f"D={block_d},{dtype}{drop}"
                    bwd = attn.BIASED_BWD[table_name].get((block_d, short), unbiased_bwd) if "bias" in drop \
                        else unbiased_bwd
                    assert (f"attn_fwd[{tag},M={fwd.block_m},N={fwd.block_n},w={fwd.num_warps},"
                            f"s={fwd.num_stages}]") in names
                    seqlens = range(1, 129) if short else range(129, 4097)
                    for deterministic in (True, False):
                        modes = {attn._dq_mode(s, bwd, deterministic) for s in seqlens}
                        for mode in modes:
                            mode_name = ("store", "atomic", "recompute")[mode]
                            assert (f"attn_bwd[{tag},dq={mode_name},M1={bwd.block_m1},N1={bwd.block_n1},"
                                    f"N2={bwd.block_n2},w={bwd.num_warps},s={bwd.num_stages}]") in names
                assert f"attn_bwd_delta[D={block_d},{dtype}]" in names


# ---------------------------------------------------------------------------------------------------------
# On a GPU: real BERT shapes in fp16/bf16.


def ragged_batch(max_seqlen: int, tokens: int, heads: int, head_dim: int, dtype, device="cuda"):
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(max_seqlen // 2, max_seqlen + 1, ())))
    lengths[0] = max_seqlen
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.tensor(lengths, device=device).cumsum(0)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim, device=device).to(dtype).requires_grad_()
    return qkv, cu_seqlens, max_seqlen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_seqlen,head_dim", [(128, 64), (512, 64), (128, 32), (512, 128), (200, 128)])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_gpu_matches_reference(dtype, max_seqlen, head_dim, deterministic):
    qkv, cu_seqlens, max_seqlen = ragged_batch(max_seqlen, 4096, 12, head_dim, dtype)
    qkv32 = qkv.detach().float().requires_grad_()
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    out, grad, grad_out = forward_backward(attn.flash_attention, qkv, deterministic=deterministic, **kwargs)
    ref, ref_grad, _ = forward_backward(reference.attention, qkv, grad_out, **kwargs)
    ref32, ref_grad32, _ = forward_backward(reference.attention, qkv32, grad_out.float(), **kwargs)
    assert_relative_rule(out, ref32, ref, atol=1e-3)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_relative_rule(grad[:, i], ref_grad32[:, i], ref_grad[:, i], atol=1e-3, name=name)


@pytest.mark.gpu
def test_gpu_dropout_reproducible_and_deterministic():
    qkv, cu_seqlens, max_seqlen = ragged_batch(512, 8192, 12, 64, torch.bfloat16)
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, "dropout_p": 0.1,
              "seed": torch.tensor(5, device="cuda")}
    out, grad, grad_out = forward_backward(attn.flash_attention, qkv, **kwargs)
    out2, grad2, _ = forward_backward(attn.flash_attention, qkv, grad_out, **kwargs)
    assert torch.equal(out, out2) and torch.equal(grad, grad2), "deterministic mode is bitwise reproducible"
    keep = attn.dropout_keep_mask(kwargs["seed"], cu_seqlens, 12, max_seqlen, 0.1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    kept = keep.sum().item() / (12 * (lengths**2).sum().item())
    assert abs(kept - 0.9) < 1e-3
    qkv32 = qkv.detach().float().requires_grad_()
    ref32, ref_grad32, _ = forward_backward(masked_reference, qkv32, grad_out.float(), cu_seqlens=cu_seqlens,
                                            keep=keep, dropout_p=0.1)
    ref, ref_grad, _ = forward_backward(masked_reference, qkv, grad_out, cu_seqlens=cu_seqlens,
                                        keep=keep, dropout_p=0.1)
    assert_relative_rule(out, ref32, ref, atol=1e-3)
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_relative_rule(grad[:, i], ref_grad32[:, i], ref_grad[:, i], atol=1e-3, name=name)

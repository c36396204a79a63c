"""MPNet's relative-position attention bias: the reference against transformers' MPNet attention, then every
backend against the reference (outputs, dqkv and the gradient of the bias table).
"""

from __future__ import annotations

import pytest
import torch
from transformers import MPNetConfig
from transformers.models.mpnet.modeling_mpnet import MPNetAttention, MPNetEncoder

from bertfast import ops
from bertfast.ops import reference

NUM_BUCKETS, MAX_DISTANCE = 32, 128


def packed_case(lengths: list[int], heads: int, head_dim: int, dtype=torch.float32, buckets: int = NUM_BUCKETS):
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    qkv = torch.randn(sum(lengths), 3, heads, head_dim).to(dtype).requires_grad_()
    table = torch.randn(buckets, heads).requires_grad_()
    return qkv, cu_seqlens, max(lengths), table


def per_sequence_attention(qkv, cu_seqlens, table, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE):
    """softmax(Q K^T / sqrt(d) + table[bucket(k - q)]) V, one sequence at a time, with MPNet's own bucketing."""
    outs = []
    for b in range(cu_seqlens.numel() - 1):
        start, end = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        q, k, v = qkv[start:end].permute(1, 2, 0, 3)  # each (heads, L, head_dim)
        pos = torch.arange(end - start)
        buckets = MPNetEncoder.relative_position_bucket(pos[None, :] - pos[:, None], num_buckets, max_distance)
        scores = q @ k.transpose(1, 2) / qkv.shape[-1] ** 0.5 + table[buckets].permute(2, 0, 1).to(qkv.dtype)
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def assert_close(actual, expected, name, rtol=1e-5, atol=1e-5):
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# The reference.


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 64), (16, 40), (33, 128), (4, 5)])
def test_bucket_is_mpnets(num_buckets, max_distance):
    distances = torch.arange(-5000, 5001)
    expected = MPNetEncoder.relative_position_bucket(distances, num_buckets, max_distance)
    assert torch.equal(reference.relative_position_bucket(distances, num_buckets, max_distance), expected)
    assert 0 <= int(expected.min()) and int(expected.max()) < num_buckets


def test_bucket_boundaries():
    """Distances 0..7 have buckets of their own each way; the log range ends in the last bucket at max_distance."""
    bucket = reference.relative_position_bucket
    d = torch.arange(8)
    assert torch.equal(bucket(-d), d)  # key before (or at) the query: the lower half
    assert torch.equal(bucket(d[1:]), d[1:] + 16)  # key after the query: the upper half
    assert int(bucket(torch.tensor(127))) == 16 + 15 and int(bucket(torch.tensor(-127))) == 15
    assert int(bucket(torch.tensor(100_000))) == 31 and int(bucket(torch.tensor(-100_000))) == 15
    assert len(set(bucket(-torch.arange(128)).tolist())) == 16


def test_bad_bucketing_is_refused():
    qkv, cu, max_seqlen, table = packed_case([3, 4], 2, 8)
    with pytest.raises(ValueError, match=r"bias_table must be \(num_buckets, heads\) = \(32, 2\)"):
        ops.attention(qkv, cu, max_seqlen, bias_table=table[:, :1])
    with pytest.raises(ValueError, match=r"\(16, 2\), got \(32, 2\)"):
        ops.attention(qkv, cu, max_seqlen, bias_table=table, num_buckets=16)
    with pytest.raises(ValueError, match="num_buckets must be at least 4"):
        reference.relative_position_bucket(torch.arange(3), 2, 128)
    with pytest.raises(ValueError, match="max_distance must exceed"):
        ops.attention(qkv, cu, max_seqlen, bias_table=table, max_distance=8)


def test_distance_bias_is_the_table_by_distance():
    table = torch.randn(NUM_BUCKETS, 3)
    bias = reference.distance_bias(table, 300)
    assert bias.shape == (3, 599)
    for d in (-299, -128, -9, -8, -7, -1, 0, 1, 7, 8, 9, 127, 128, 299):
        bucket = int(MPNetEncoder.relative_position_bucket(torch.tensor(d)))
        assert torch.equal(bias[:, d + 299], table[bucket])
    assert reference.distance_bias(table, 0).shape == (3, 1)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("lengths", [[1, 5, 0, 40, 200], [137], [0, 0]], ids=["ragged", "past_max_distance", "empty"])
def test_matches_mpnet_math_per_sequence(backend, lengths):
    qkv, cu, _, table = packed_case(lengths, 2, 16)
    bound = max(lengths) + 3  # max_seqlen bounds the longest sequence
    with ops.use_backend(backend):
        out = ops.attention(qkv, cu, bound, bias_table=table)
    expected = per_sequence_attention(qkv, cu, table)
    grad_out = torch.randn_like(out)
    assert_close(out, expected, "output")
    if not out.numel():
        return
    for name, g, r in zip(("dqkv", "dtable"), grads(out, (qkv, table), grad_out),
                          grads(expected, (qkv, table), grad_out), strict=True):
        assert_close(g, r, name)


def test_dropout_path_applies_the_bias_before_softmax():
    """With dropout p -> 0 in training the explicit (dropout) path must give the biased result too."""
    qkv, cu, max_seqlen, table = packed_case([7, 30], 2, 16)
    view_out = reference.attention_with_dropout(qkv, cu, max_seqlen, 0.1, None, lambda probs, rows: probs,
                                                table)
    expected = per_sequence_attention(qkv, cu, table)
    assert_close(view_out, expected, "output")
    grad_out = torch.randn_like(expected)
    for name, g, r in zip(("dqkv", "dtable"), grads(view_out, (qkv, table), grad_out),
                          grads(expected, (qkv, table), grad_out), strict=True):
        assert_close(g, r, name)


def mpnet_attention(heads=4, hidden=64):
    config = MPNetConfig(hidden_size=hidden, num_attention_heads=heads, attention_probs_dropout_prob=0.0,
                         hidden_dropout_prob=0.0, num_hidden_layers=1, intermediate_size=4 * hidden)
    encoder = MPNetEncoder(config).eval()
    with torch.no_grad():
        encoder.relative_attention_bias.weight.normal_(0, 1.0)
    return encoder, encoder.layer[0].attention


def bertfast_mpnet_attention(attention: MPNetAttention, table: torch.Tensor, hidden_states: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """MPNetAttention's output (o(attention) + residual, LayerNorm) through ops.padded_attention with the bias."""
    self_attn = attention.attn
    shape = (*hidden_states.shape[:2], self_attn.num_attention_heads, self_attn.attention_head_size)
    q, k, v = (layer(hidden_states).view(shape) for layer in (self_attn.q, self_attn.k, self_attn.v))
    context = ops.padded_attention(q, k, v, mask.bool(), bias_table=table).flatten(2)
    return attention.LayerNorm(attention.dropout(self_attn.o(context)) + hidden_states)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_matches_transformers_mpnet_attention(backend):
    """transformers' MPNetAttention with the encoder's position bias and extended mask, on right-padded rows."""
    encoder, attention = mpnet_attention()
    lengths = [150, 9, 1, 64]
    seqlen = max(lengths)
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    hidden_states = torch.randn(len(lengths), seqlen, 64, requires_grad=True)
    table = encoder.relative_attention_bias.weight

    position_bias = encoder.compute_position_bias(hidden_states)
    extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    expected = attention(hidden_states, extended, position_bias)[0]
    with ops.use_backend(backend):
        out = bertfast_mpnet_attention(attention, table, hidden_states, mask)
    real = mask.bool()
    assert_close(out[real], expected[real], "output")
    grad_out = torch.randn_like(out) * mask[..., None]
    params = (hidden_states, table, attention.attn.q.weight)
    for name, g, r in zip(("dhidden", "dtable", "dq_weight"), grads(out, params, grad_out),
                          grads(expected, params, grad_out), strict=True):
        assert_close(g, r, name)

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


# ---------------------------------------------------------------------------------------------------------
# The Triton kernels (the interpreter on CPU) against the reference.

attn = pytest.importorskip("bertfast.kernels.attention")

TRITON_CASES = {
    # name: (lengths, heads, head_dim); 8 = the end of the exact buckets, 128 = max_distance
    "ragged_past_max_distance": ([1, 0, 9, 150, 40], 2, 32),
    "one_block_store": ([60, 7, 1], 2, 64),  # max_seqlen <= BLOCK_N1 (64 biased): dQ stored from one key block
    "short_many_key_blocks": ([100, 7, 1], 2, 64),  # biased, head_dim 64, short: two 64-key blocks
    "many_key_blocks": ([200, 3], 1, 64),  # dQ recomputed (deterministic) or atomic
    "empty_sequences": ([0, 5, 0, 33, 0], 2, 32),
}


def triton_and_reference(lengths, heads, head_dim, dtype=torch.float32, bound=0, **kwargs):
    qkv, cu, max_seqlen, table = packed_case(lengths, heads, head_dim, dtype)
    out = attn.flash_attention(qkv, cu, max_seqlen + bound, bias_table=table, **kwargs)
    grad_out = torch.randn_like(out)
    return qkv, cu, max_seqlen, table, out, grad_out, grads(out, (qkv, table), grad_out)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case, deterministic):
    qkv, cu, max_seqlen, table, out, grad_out, (dqkv, dtable) = triton_and_reference(
        *TRITON_CASES[case], deterministic=deterministic)
    ref = reference.attention(qkv, cu, max_seqlen, bias_table=table)
    ref_dqkv, ref_dtable = grads(ref, (qkv, table), grad_out)
    assert_close(out, ref, "output")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(dqkv[:, i], ref_dqkv[:, i], name)
    assert_close(dtable, ref_dtable, "dtable")
    # Without the bias the result is another one: the kernels did add it.
    assert not torch.allclose(out, reference.attention(qkv, cu, max_seqlen), atol=1e-2)


@pytest.mark.parametrize("bound", [1, 70])
def test_triton_max_seqlen_is_an_upper_bound(bound):
    """The per-distance bias is laid out by max_seqlen: a looser bound gives the same result."""
    qkv, cu, max_seqlen, table, out, grad_out, (dqkv, dtable) = triton_and_reference([3, 0, 60], 2, 32, bound=bound)
    ref = reference.attention(qkv, cu, max_seqlen, bias_table=table)
    ref_dqkv, ref_dtable = grads(ref, (qkv, table), grad_out)
    assert_close(out, ref, "output")
    assert_close(dqkv, ref_dqkv, "dqkv")
    assert_close(dtable, ref_dtable, "dtable")


@pytest.mark.parametrize("lengths,deterministic", [([3, 64, 150], True), ([3, 64, 150], False), ([5, 40, 100], True)],
                         ids=["recompute", "atomic", "store"])
def test_triton_dropout_with_bias(lengths, deterministic):
    """Dropout drops probabilities after the softmax; the bias and its gradient are before it."""
    p, seed = 0.25, torch.tensor(4321)
    qkv, cu, max_seqlen, table, out, grad_out, (dqkv, dtable) = triton_and_reference(
        lengths, 2, 32, dropout_p=p, seed=seed, deterministic=deterministic)
    keep = attn.dropout_keep_mask(seed, cu, 2, max_seqlen, p)
    ref = reference.attention_with_dropout(qkv, cu, max_seqlen, p, None,
                                           lambda probs, rows: probs * keep / (1.0 - p), table)
    ref_dqkv, ref_dtable = grads(ref, (qkv, table), grad_out)
    assert_close(out, ref, "output")
    assert_close(dqkv, ref_dqkv, "dqkv")
    assert_close(dtable, ref_dtable, "dtable")


def test_triton_fp16_relative_rule():
    from numerics import assert_relative_rule

    qkv16, cu, max_seqlen, table = packed_case([1, 17, 64, 150], 2, 64, torch.float16)
    out = attn.flash_attention(qkv16, cu, max_seqlen, bias_table=table)
    grad_out = torch.randn_like(out)
    dqkv, dtable = grads(out, (qkv16, table), grad_out)
    qkv32 = qkv16.detach().float().requires_grad_()
    ref16 = reference.attention(qkv16, cu, max_seqlen, bias_table=table)
    ref32 = reference.attention(qkv32, cu, max_seqlen, bias_table=table)
    ref_dqkv16, ref_dtable16 = grads(ref16, (qkv16, table), grad_out)
    ref_dqkv32, ref_dtable32 = grads(ref32, (qkv32, table), grad_out.float())
    assert out.dtype == dqkv.dtype == torch.float16 and dtable.dtype == torch.float32
    assert_relative_rule(out, ref32, ref16, atol=1e-3)
    assert_relative_rule(dqkv, ref_dqkv32, ref_dqkv16, atol=1e-3, name="dqkv")
    assert_relative_rule(dtable, ref_dtable32, ref_dtable16, atol=1e-3, name="dtable")


def test_every_backward_config_can_skew_its_tiles():
    """The diagonal sums skew a (keys, queries) tile along its keys: that needs no more queries than keys."""
    biased = [bwd for table in attn.BIASED_BWD.values() for bwd in table.values()]
    for bwd in [bwd for table in attn.CONFIGS.values() for _, bwd in table.values()] + biased:
        assert bwd.block_m1 <= bwd.block_n1, bwd


BIASED_OVERRIDES = [(table, key) for table, entries in attn.BIASED_BWD.items() for key in entries]


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("table,key", BIASED_OVERRIDES, ids=[f"{t}-D{k[0]}-{'short' if k[1] else 'long'}"
                                                             for t, k in BIASED_OVERRIDES])
def test_biased_backward_tiles_of_each_table(table, key, dropout, monkeypatch):
    """The biased calls' own backward tiles (each table's, as its GPUs get them), in every dQ mode they reach."""
    block_d, short = key
    monkeypatch.setattr(attn, "_table", lambda device: table)
    _, bwd = attn.select_configs(torch.device("cpu"), block_d, attn.SHORT_SEQLEN if short else 512, biased=True)
    assert bwd == attn.BIASED_BWD[table][key]
    longest = min(attn.SHORT_SEQLEN, bwd.block_n1 + 3) if short else attn.SHORT_SEQLEN + 3
    kwargs = {"dropout_p": 0.25, "seed": torch.tensor(99)} if dropout else {}
    for deterministic in (True, False):
        qkv, cu, max_seqlen, table_, out, grad_out, (dqkv, dtable) = triton_and_reference(
            [longest, 5], 1, block_d, deterministic=deterministic, **kwargs)
        assert attn.select_configs(qkv.device, block_d, max_seqlen, biased=True)[1] == bwd
        if dropout:
            keep = attn.dropout_keep_mask(kwargs["seed"], cu, 1, max_seqlen, 0.25)
            ref = reference.attention_with_dropout(qkv, cu, max_seqlen, 0.25, None,
                                                   lambda probs, rows, keep=keep: probs * keep / 0.75, table_)
        else:
            ref = reference.attention(qkv, cu, max_seqlen, bias_table=table_)
        ref_dqkv, ref_dtable = grads(ref, (qkv, table_), grad_out)
        assert_close(out, ref, "output")
        assert_close(dqkv, ref_dqkv, "dqkv")
        assert_close(dtable, ref_dtable, "dtable")


def test_aot_specs_include_the_biased_kernels():
    names = {spec.name for spec in attn.aot_specs()}
    for kernel in ("attn_fwd", "attn_bwd"):
        for tag in (",bias", ",dropout,bias"):
            assert any(name.startswith(kernel + "[") and tag + "," in name for name in names), (kernel, tag)


def test_ops_route_biased_calls_to_the_kernels():
    qkv, cu, max_seqlen, table = packed_case([6, 20], 2, 32)
    with ops.use_backend("triton"):
        assert ops.implementation("attention", qkv, table) == ("triton", attn.attention)
        # A table that is not floating point is the reference's (which then refuses it).
        assert ops.implementation("attention", qkv, table.to(torch.int64))[0] == "torch"
        out = ops.attention(qkv, cu, max_seqlen, bias_table=table)
    assert_close(out, attn.flash_attention(qkv, cu, max_seqlen, bias_table=table), "ops output")
    assert_close(out, reference.attention(qkv, cu, max_seqlen, bias_table=table), "reference")


# ---------------------------------------------------------------------------------------------------------
# The native CPU kernel (inference) against the reference.


def native_module():
    return pytest.importorskip("bertfast.ops.native", exc_type=ModuleNotFoundError)


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("bound", [0, 9])
def test_native_inference_matches_mpnet_math(head_dim, bound):
    native = native_module()
    qkv, cu, max_seqlen, table = packed_case([1, 0, 9, 150, 40, 7], 3, head_dim)
    with torch.no_grad(), ops.use_backend("native"):
        assert ops.implementation("attention", qkv, table) == ("native", native.attention)
        out = ops.attention(qkv, cu, max_seqlen + bound, bias_table=table)
    expected = per_sequence_attention(qkv.detach(), cu, table.detach())
    assert_close(out, expected, "output")
    assert not torch.allclose(out, reference.attention(qkv.detach(), cu, max_seqlen), atol=1e-2)


def test_native_inference_bf16_relative_rule():
    from numerics import assert_relative_rule

    native_module()
    qkv, cu, max_seqlen, table = packed_case([3, 130, 20], 2, 64)
    qkv16 = qkv.detach().bfloat16()
    with torch.no_grad(), ops.use_backend("native"):
        out = ops.attention(qkv16, cu, max_seqlen, bias_table=table.detach())
        ref16 = reference.attention(qkv16, cu, max_seqlen, bias_table=table.detach())
    ref32 = reference.attention(qkv.detach(), cu, max_seqlen, bias_table=table.detach())
    assert out.dtype == torch.bfloat16
    assert_relative_rule(out, ref32, ref16, atol=2.0**-8)


def test_native_kernel_checks_the_bias_layout():
    native = native_module()
    qkv, cu, max_seqlen, table = packed_case([4, 6], 2, 16)
    bias = reference.distance_bias(table.detach(), max_seqlen)
    with pytest.raises(ValueError, match=r"bias must be \(heads, 2 \* max_seqlen - 1\) = \(2, 11\)"):
        native._attention_op(qkv.detach(), cu, max_seqlen, 0.25, bias[:, 1:])
    with pytest.raises(ValueError, match="bias must be float32"):
        native._attention_op(qkv.detach(), cu, max_seqlen, 0.25, bias.double())


def test_native_inference_in_transformers_mpnet_attention():
    native_module()
    encoder, attention = mpnet_attention()
    lengths = [150, 9, 1]
    mask = (torch.arange(150)[None, :] < torch.tensor(lengths)[:, None]).long()
    hidden_states = torch.randn(3, 150, 64)
    extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    with torch.no_grad():
        expected = attention(hidden_states, extended, encoder.compute_position_bias(hidden_states))[0]
        with ops.use_backend("native"):
            out = bertfast_mpnet_attention(attention, encoder.relative_attention_bias.weight, hidden_states, mask)
    assert_close(out[mask.bool()], expected[mask.bool()], "output")


# ---------------------------------------------------------------------------------------------------------
# torch.compile: the biased call traces without a graph break (CPU backends; the Triton op on a GPU).


def test_compiles_without_graph_break():
    """The native backend: its C++ op's fake with the bias in inference, the biased reference in training."""
    native_module()
    qkv, cu, max_seqlen, table = packed_case([5, 0, 12], 2, 16)
    torch._dynamo.reset()

    def step(qkv, table):
        return ops.attention(qkv, cu, max_seqlen, bias_table=table)

    compiled = torch.compile(step, fullgraph=True)
    with ops.use_backend("native"):
        with torch.no_grad():
            assert_close(compiled(qkv, table), step(qkv, table), "inference")
        out = compiled(qkv, table)
        expected = step(qkv, table)
    grad_out = torch.randn_like(out)
    assert_close(out, expected, "output")
    for name, g, r in zip(("dqkv", "dtable"), grads(out, (qkv, table), grad_out),
                          grads(expected, (qkv, table), grad_out), strict=True):
        assert_close(g, r, name)


# ---------------------------------------------------------------------------------------------------------
# On a GPU: BERT shapes in fp16/bf16.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_seqlen,head_dim", [(128, 64), (512, 64), (200, 128), (128, 32)])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_gpu_matches_reference(dtype, max_seqlen, head_dim, deterministic):
    from numerics import assert_relative_rule

    lengths = [max_seqlen] + [int(n) for n in torch.randint(max_seqlen // 2, max_seqlen + 1, (30,))]
    qkv, cu, max_seqlen, table = packed_case(lengths, 12, head_dim, dtype)
    qkv, cu, table = (t.detach().cuda().requires_grad_(t.requires_grad) for t in (qkv, cu, table))
    out = attn.flash_attention(qkv, cu, max_seqlen, bias_table=table, deterministic=deterministic)
    grad_out = torch.randn_like(out)
    dqkv, dtable = grads(out, (qkv, table), grad_out)
    again = grads(attn.flash_attention(qkv, cu, max_seqlen, bias_table=table, deterministic=deterministic),
                  (qkv, table), grad_out)
    assert torch.equal(dtable, again[1]), "the table's gradient is bitwise reproducible"
    qkv32 = qkv.detach().float().requires_grad_()
    ref = reference.attention(qkv, cu, max_seqlen, bias_table=table)
    ref32 = reference.attention(qkv32, cu, max_seqlen, bias_table=table)
    ref_dqkv, ref_dtable = grads(ref, (qkv, table), grad_out)
    ref_dqkv32, ref_dtable32 = grads(ref32, (qkv32, table), grad_out.float())
    assert_relative_rule(out, ref32, ref, atol=1e-3)
    assert_relative_rule(dqkv, ref_dqkv32, ref_dqkv, atol=1e-3, name="dqkv")
    assert_relative_rule(dtable, ref_dtable32, ref_dtable, atol=1e-3 * max(ref_dtable32.abs().max().item(), 1.0),
                         name="dtable")

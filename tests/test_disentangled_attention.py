"""DeBERTa's disentangled attention in bertfast::attention: the native CPU kernels (inference and training) against the
padded reference, output and every gradient (qkv and both position tables), on ragged batches with empty, one-token
and several-query-block sequences longer than the position buckets, with dropout, with the content-to-position or
the position-to-content term alone, and with the columns of a mask with holes."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.common.relative_position import deberta_position_index

pytest.importorskip("bertfast.ops.native")

HEADS, HEAD_DIM = 3, 16
BUCKETS, MAX_RELATIVE = 8, 32  # small buckets: most distances here are log-bucketed or clamped
SPAN = BUCKETS


def inputs(lengths: list[int], dtype: torch.dtype, terms: tuple[str, ...], max_seqlen: int):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, HEADS, HEAD_DIM, dtype=torch.float64).to(dtype).requires_grad_()
    tables = {name: (torch.randn(2 * SPAN, HEADS, HEAD_DIM) if term in terms else None)
              for name, term in (("pos_key", "c2p"), ("pos_query", "p2c"))}
    tables = {k: None if v is None else v.requires_grad_() for k, v in tables.items()}
    index = deberta_position_index(max_seqlen, BUCKETS, MAX_RELATIVE, SPAN)
    return qkv, cu, tables, index


def run(backend: str, qkv, cu, max_seqlen, p, tables, index, dy, columns=None, seed=5):
    """(out, dqkv, d of each present table) of ops.attention in training under ``backend``."""
    present = [t for t in tables.values() if t is not None]
    with ops.use_backend(backend):
        torch.manual_seed(seed)
        out = ops.attention(qkv, cu, max_seqlen, p, training=True, softmax_scale=(HEAD_DIM * 3) ** -0.5,
                            columns=columns, pos_index=index, **tables)
    return (out, *torch.autograd.grad(out, [qkv, *present], dy))


def detached(tables: dict, dtype: torch.dtype = torch.float32) -> dict:
    return {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in tables.items()}


@pytest.mark.parametrize("lengths", [[5, 1, 17, 0, 33], [1], [150, 1, 70]])
@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_matches_the_reference(lengths, terms, p, dtype, one_thread):
    max_seqlen = max(lengths) + 2
    qkv, cu, tables, index = inputs(lengths, dtype, terms, max_seqlen)
    dy = torch.randn(qkv.shape[0], HEADS, HEAD_DIM).to(dtype)
    assert ops.implementation("attention", qkv, pos_index=index)[0] == "native"
    actual = run("native", qkv, cu, max_seqlen, p, tables, index, dy)
    same_dtype = run("torch", qkv, cu, max_seqlen, p, detached(tables), index, dy)
    names = ("out", "dqkv", *[f"d{k}" for k, v in tables.items() if v is not None])
    if dtype == torch.float32:
        assert_matches_reference(names, actual, same_dtype, same_dtype)
        return
    qkv32 = qkv.detach().float().requires_grad_()
    fp32 = run("torch", qkv32, cu, max_seqlen, p, detached(tables), index, dy.float())
    assert_matches_reference(names[:2], actual[:2], tuple(t.to(dtype) for t in fp32[:2]), same_dtype[:2])
    # The tables are float32 in every run; the bf16 runs' rounding of q and k reaches their gradients.
    ulp = 2.0 ** -8
    for name, a, r in zip(names[2:], actual[2:], fp32[2:], strict=True):
        scale = max(r.abs().max().item(), 1.0)
        torch.testing.assert_close(a, r, atol=8 * ulp * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("lengths", [[5, 1, 17, 0, 33], [130, 2]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_matches_the_reference(lengths, dtype, one_thread):
    max_seqlen = max(lengths)
    qkv, cu, tables, index = inputs(lengths, dtype, ("c2p", "p2c"), max_seqlen)
    qkv = qkv.detach()
    with torch.no_grad():
        got = ops.attention(qkv, cu, max_seqlen, pos_index=index, **detached(tables))
        with ops.use_backend("torch"):
            same = ops.attention(qkv, cu, max_seqlen, pos_index=index, **detached(tables))
            fp32 = ops.attention(qkv.float(), cu, max_seqlen, pos_index=index, **detached(tables))
    assert_matches_reference(("out",), (got,), (fp32.to(dtype) if dtype != torch.float32 else fp32,), (same,))


def test_columns_of_a_mask_with_holes_match_the_reference(one_thread):
    lengths = [40, 1, 0, 17]
    generator = torch.Generator().manual_seed(3)
    columns = torch.cat([torch.cumsum(torch.randint(0, 3, (n,), generator=generator) + 1, 0) - 1 for n in lengths])
    width = int(columns.max()) + 1
    qkv, cu, tables, index = inputs(lengths, torch.float32, ("c2p", "p2c"), width)
    dy = torch.randn(qkv.shape[0], HEADS, HEAD_DIM)
    actual = run("native", qkv, cu, width, 0.2, tables, index, dy, columns=columns)
    expected = run("torch", qkv, cu, width, 0.2, detached(tables), index, dy, columns=columns)
    assert_matches_reference(("out", "dqkv", "dpos_key", "dpos_query"), actual, expected, expected)


def test_the_position_gradients_do_not_depend_on_the_thread_count():
    lengths = [60, 3, 90, 1, 44]
    qkv, cu, tables, index = inputs(lengths, torch.float32, ("c2p", "p2c"), 90)
    dy = torch.randn(qkv.shape[0], HEADS, HEAD_DIM)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("native", qkv, cu, 90, 0.0, tables, index, dy)
        torch.set_num_threads(2)
        two = run("native", qkv, cu, 90, 0.0, tables, index, dy)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[2:], two[2:], strict=True):
        assert torch.equal(a, b)


def test_bad_disentangled_arguments_are_refused_by_name():
    qkv, cu, tables, index = inputs([4, 2], torch.float32, ("c2p",), 4)
    with pytest.raises(ValueError, match="pos_index and at least one of pos_key and pos_query"):
        ops.attention(qkv.detach(), cu, 4, pos_key=tables["pos_key"])
    with pytest.raises(ValueError, match="pos_key must be \\(positions, heads, head_dim\\)"):
        ops.attention(qkv.detach(), cu, 4, pos_key=torch.randn(16, HEADS, 8), pos_index=index)
    with pytest.raises(ValueError, match="pos_index must be \\(2 \\* max_seqlen - 1,\\) integers"):
        ops.attention(qkv.detach(), cu, 4, pos_key=tables["pos_key"], pos_index=index[:3])
    with pytest.raises(ValueError, match="outside the 16 positions"):
        ops.attention(qkv.detach(), cu, 4, pos_key=tables["pos_key"], pos_index=index + 100)

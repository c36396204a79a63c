"""The native CPU attention in training (csrc/attention_train.cpp): output and every gradient (qkv and the
relative-position bias table) against the padded reference on the same seed, with and without dropout,
bias and a sliding window, float32 and bfloat16, on ragged batches with empty and one-token sequences and
sequences of several query blocks (64 queries each)."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.ops import reference

pytest.importorskip("bertfast.ops.native")

HEADS, HEAD_DIM, BUCKETS, MAX_DISTANCE = 3, 24, 8, 16


def batch(lengths: list[int], dtype: torch.dtype = torch.float32):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, HEADS, HEAD_DIM, dtype=torch.float64).to(dtype).requires_grad_()
    return qkv, cu


def run(backend: str, qkv, cu, max_seqlen, p, table, dy, seed=7, window=None, columns=None):
    """(out, dqkv[, dtable]) of ops.attention in training under ``backend``, dropout seeded by ``seed``."""
    inputs = [qkv] if table is None else [qkv, table]
    with ops.use_backend(backend):
        torch.manual_seed(seed)
        out = ops.attention(qkv, cu, max_seqlen, p, training=True, bias_table=table, num_buckets=BUCKETS,
                            max_distance=MAX_DISTANCE, window=window, columns=columns)
    return (out, *torch.autograd.grad(out, inputs, dy))


@pytest.mark.parametrize("lengths,window", [([5, 1, 17, 0, 33], None), ([1], None), ([40, 3, 3], None),
                                            ([150, 1, 70], None), ([150, 1, 70, 9], 0), ([150, 1, 70, 9], 5),
                                            ([130, 20], 64), ([12, 3], 40)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_matches_the_reference(lengths, window, p, with_bias, dtype, one_thread):
    qkv, cu = batch(lengths, dtype)
    table = torch.randn(BUCKETS, HEADS, requires_grad=True) if with_bias else None
    max_seqlen = max(lengths) + 3  # a looser bound than the longest sequence changes nothing
    dy = torch.randn(qkv.shape[0], HEADS, HEAD_DIM).to(dtype)
    assert ops.implementation("attention", qkv, table, window=window)[0] == "native"
    actual = run("native", qkv, cu, max_seqlen, p, table, dy, window=window)
    same_dtype = run("torch", qkv, cu, max_seqlen, p, table, dy, window=window)
    qkv32 = qkv.detach().float().requires_grad_()
    table32 = table.detach().clone().requires_grad_() if with_bias else None
    fp32 = run("torch", qkv32, cu, max_seqlen, p, table32, dy.float(), window=window)
    names = ("out", "dqkv", "dtable")[: len(actual)]
    if dtype == torch.float32:
        assert_matches_reference(names, actual, same_dtype, same_dtype)
    else:  # the table and its gradient stay float32
        assert_matches_reference(names[:2], actual[:2], tuple(t.to(dtype) for t in fp32[:2]), same_dtype[:2])
        if with_bias:
            assert_matches_reference(names[2:], actual[2:], fp32[2:], same_dtype[2:])


def hole_columns(lengths: list[int], generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Each token's column in a padded row with random holes (and left padding), and the padded width."""
    columns = []
    for n in lengths:
        gaps = torch.randint(0, 3, (n,), generator=generator)
        columns.append(torch.cumsum(gaps + 1, 0) - 1)
    width = max(int(c[-1]) + 1 for c in columns if len(c))
    return torch.cat(columns), width


@pytest.mark.parametrize("window", [None, 0, 5])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_columns_of_a_mask_with_holes_match_the_reference(window, p, with_bias, one_thread):
    """Distances counted in the tokens' padded columns (a mask with holes): the bias and the window."""
    lengths = [90, 1, 0, 17]
    qkv, cu = batch(lengths)
    columns, width = hole_columns(lengths, torch.Generator().manual_seed(3))
    table = torch.randn(BUCKETS, HEADS, requires_grad=True) if with_bias else None
    dy = torch.randn(qkv.shape[0], HEADS, HEAD_DIM)
    actual = run("native", qkv, cu, width, p, table, dy, window=window, columns=columns)
    expected = run("torch", qkv, cu, width, p, table, dy, window=window, columns=columns)
    names = ("out", "dqkv", "dtable")[: len(actual)]
    assert_matches_reference(names, actual, expected, expected)
    if window != 0 and (window is not None or with_bias):  # the columns change the answer (window 0: self only)
        plain = run("native", qkv, cu, width, p, table, dy, window=window)
        assert not torch.allclose(plain[0], actual[0])


@pytest.mark.parametrize("window", [None, 0, 7])
def test_inference_matches_the_reference(window, one_thread):
    qkv, cu = batch([150, 1, 70, 0, 9])
    with torch.inference_mode():
        out = ops.attention(qkv, cu, 150, window=window)
        expected = reference.attention(qkv, cu, 150, window=window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dropout_of_one_drops_everything():
    """p = 1 drops every probability: the output and the gradients of q and k are exactly zero."""
    qkv, cu = batch([4, 9])
    out, dqkv = run("native", qkv, cu, 9, 1.0, None, torch.randn(13, HEADS, HEAD_DIM))
    assert not out.any() and not dqkv[:, :2].any()


def test_bias_gradient_is_the_same_for_any_thread_count():
    qkv, cu = batch([30, 7, 19, 1, 25])
    table = torch.randn(BUCKETS, HEADS, requires_grad=True)
    dy = torch.randn(qkv.shape[0], HEADS, HEAD_DIM)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run("native", qkv, cu, 30, 0.1, table, dy))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_a_skewed_batch_matches_each_sequence_run_alone(one_thread):
    """One long sequence among short ones: the packed call equals each sequence attending on its own."""
    lengths = [96] + [6] * 5
    qkv, cu = batch(lengths)
    dy = torch.randn(qkv.shape[0], HEADS, HEAD_DIM)
    out, dqkv = run("native", qkv, cu, 96, 0.0, None, dy)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = qkv.detach()[start:end].clone().requires_grad_()
        expected = reference.attention(alone, torch.tensor([0, end - start], dtype=torch.int32), end - start)
        torch.testing.assert_close(out[start:end], expected, rtol=1e-5, atol=1e-5)
        grad = torch.autograd.grad(expected, alone, dy[start:end])[0]
        torch.testing.assert_close(dqkv[start:end], grad, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named():
    qkv, cu = batch([3, 2])
    with pytest.raises(ValueError, match="needs a seed"):
        torch.ops.bertfast.attention(qkv, cu, 3, 0.5, None, None, 0.1)
    with pytest.raises(ValueError, match="longer than max_seqlen"):
        torch.ops.bertfast.attention(qkv, cu, 2, 0.5, None, torch.tensor(1), 0.1)
    with pytest.raises(ValueError, match="columns must increase"):
        torch.ops.bertfast.attention(qkv.detach(), cu, 3, 0.5, None, None, 0.0, None, torch.tensor([0, 2, 1, 0, 1]))
    with pytest.raises(ValueError, match="span more than max_seqlen"):
        torch.ops.bertfast.attention(qkv.detach(), cu, 3, 0.5, None, None, 0.0, None, torch.tensor([0, 1, 9, 0, 1]))
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.bertfast.attention_backward(torch.zeros(5, HEADS, HEAD_DIM), qkv.detach(), torch.zeros(HEADS, 5),
                                              cu, 3, 0.5)

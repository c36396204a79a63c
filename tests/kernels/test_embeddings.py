"""Triton embeddings (interpreter on CPU) against the reference: output and the gradients of all
three tables (duplicate ids, runs across scatter blocks, padding_idx) and of the LayerNorm."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_matches_reference

from bertfast import ops
from bertfast.kernels import embeddings as kernel
from bertfast.ops import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ("output", "grad word", "grad position", "grad type", "grad ln weight", "grad ln bias")
EPS = 1e-12
VOCAB, MAX_POS, TYPES = 40, 64, 2


def make_ids(rows: int, device="cpu"):
    """Packed ids of sequences of up to 50 tokens: repeated words (0 is padding), 0.. positions."""
    input_ids = torch.randint(0, VOCAB, (rows,), device=device)
    input_ids[::3] = 3  # a word far more frequent than the others: its run spans scatter blocks
    input_ids[1::5] = 0
    lengths = [min(50, rows - start) for start in range(0, rows, 50)]
    position_ids = torch.cat([torch.arange(n) for n in lengths]).to(device) if rows else input_ids.clone()
    token_type_ids = (torch.rand(rows, device=device) < 0.4).long()
    return input_ids, position_ids, token_type_ids


def make_tables(hidden: int, dtype=torch.float32, device="cpu"):
    tables = [torch.randn(VOCAB, hidden), torch.randn(MAX_POS, hidden), torch.randn(TYPES, hidden)]
    ln = [1 + 0.2 * torch.randn(hidden), 0.1 * torch.randn(hidden)]
    return [t.to(device=device, dtype=dtype) for t in (*tables, *ln)]


def run(fn, ids, tables, grad, dropout_p=0.0, training=False, padding_idx=0, inputs_embeds=None):
    """(output, grads of word, position, type tables (or inputs_embeds for word), ln weight, ln bias)."""
    tables = [t.detach().requires_grad_() for t in tables]
    wrt = list(tables)
    if inputs_embeds is not None:
        inputs_embeds = inputs_embeds.detach().requires_grad_()
        wrt[0] = inputs_embeds
    y = fn(*ids, *tables, EPS, dropout_p, training, inputs_embeds=inputs_embeds, padding_idx=padding_idx)
    return (y.detach(), *torch.autograd.grad(y, wrt, grad))


def check(ids, tables, padding_idx=0, inputs_embeds=None):
    dtype, device = tables[0].dtype, tables[0].device
    grad = torch.randn((ids[1].numel(), tables[0].shape[1]), dtype=dtype, device=device)
    embeds32 = None if inputs_embeds is None else inputs_embeds.float()
    actual = run(kernel.embeddings, ids, tables, grad, padding_idx=padding_idx, inputs_embeds=inputs_embeds)
    ref32 = run(reference.embeddings, ids, [t.float() for t in tables], grad.float(), padding_idx=padding_idx,
                inputs_embeds=embeds32)
    ref_same = run(reference.embeddings, ids, tables, grad, padding_idx=padding_idx, inputs_embeds=inputs_embeds)
    assert_matches_reference(NAMES, actual, ref32, ref_same)
    return actual


@pytest.mark.parametrize(
    "rows,hidden", [(1, 8), (3, 384), (127, 768), (3, 1000), (1, 1024), (127, 1024), (2, 4096)]
)
def test_fp32_matches_reference(rows, hidden):
    ids = make_ids(rows)
    _, d_word, *_ = check(ids, make_tables(hidden))
    if rows == 127:
        assert (ids[0] == 3).sum() > kernel._SEGMENT_ROWS and (ids[2] == 0).sum() > kernel._SEGMENT_ROWS
    assert torch.equal(d_word[0], torch.zeros_like(d_word[0])), "the padding row gets no gradient"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("rows,hidden", [(1, 8), (3, 1000), (127, 768)])
def test_half_precision_relative_rule(rows, hidden, dtype):
    check(make_ids(rows), make_tables(hidden, DTYPES[dtype]))


def test_without_padding_idx_and_with_a_negative_one():
    ids = make_ids(60)
    ids[0][:5] = VOCAB - 1
    check(ids, make_tables(32), padding_idx=None)
    _, d_word, *_ = check(ids, make_tables(32), padding_idx=-1)
    assert torch.equal(d_word[VOCAB - 1], torch.zeros(32))


def test_inputs_embeds_replace_the_word_lookup():
    ids = make_ids(70)
    tables = make_tables(48)
    inputs_embeds = torch.randn(70, 48)
    _, d_embeds, *_ = check(ids, tables, inputs_embeds=inputs_embeds)
    assert d_embeds.shape == inputs_embeds.shape
    # The word table takes no part and gets no gradient (as in the reference).
    tables = [t.requires_grad_() for t in tables]
    y = kernel.embeddings(None, ids[1], ids[2], *tables, EPS, 0.0, False, inputs_embeds=inputs_embeds)
    assert torch.autograd.grad(y.sum(), tables, allow_unused=True)[0] is None
    check(ids, tables, inputs_embeds=inputs_embeds.bfloat16())  # bf16 vectors, fp32 tables: fp32 out


def test_batched_ids_and_zero_tokens():
    ids, tables = [t.view(2, 20) for t in make_ids(40)], make_tables(16)
    grad = torch.randn(2, 20, 16)
    actual = run(kernel.embeddings, ids, tables, grad)
    expected = run(reference.embeddings, ids, tables, grad)
    assert actual[0].shape == (2, 20, 16)
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    empty = [t[:0] for t in make_ids(5)]
    out, *grads = run(kernel.embeddings, empty, tables, torch.zeros(0, 16))
    assert out.shape == (0, 16)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize(
    "pattern",
    ["all_same", "two_values", "runs_of_block_size", "alternating", "distinct", "one_token"],
)
def test_scatter_rows_sums_duplicates_exactly(pattern):
    n = {"one_token": 1, "runs_of_block_size": 4 * kernel._SEGMENT_ROWS}.get(pattern, 150)
    ids = {
        "all_same": torch.full((n,), 5),
        "two_values": (torch.rand(n) < 0.5).long() * 6,
        "runs_of_block_size": torch.arange(n) // kernel._SEGMENT_ROWS,
        "alternating": torch.arange(n) % 2,
        "distinct": torch.randperm(n),
        "one_token": torch.tensor([3]),
    }[pattern]
    n_table = int(ids.max()) + 3
    dh = torch.randn(n, 24)
    expected = torch.zeros(n_table, 24, dtype=torch.float64).index_add_(0, ids, dh.double())
    torch.testing.assert_close(kernel.scatter_rows(dh, ids, n_table, torch.float32), expected.float(),
                               rtol=1e-5, atol=1e-5)
    skipped = kernel.scatter_rows(dh, ids, n_table, torch.float32, skip_id=int(ids[0]))
    assert torch.equal(skipped[ids[0]], torch.zeros(24))


def _dropped(p: float, rows: int = 64, hidden: int = 384, seed: int = 1):
    torch.manual_seed(seed)
    ids, tables = make_ids(rows), make_tables(hidden)
    grad = torch.randn(rows, hidden)
    torch.manual_seed(seed + 100)
    return ids, tables, grad, run(kernel.embeddings, ids, tables, grad, dropout_p=p, training=True)


def test_dropout_is_reproducible_from_the_seed():
    *_, first = _dropped(0.3, rows=16)
    *_, again = _dropped(0.3, rows=16)
    *_, other = _dropped(0.3, rows=16, seed=2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_one_minus_p_and_backward_uses_the_forward_mask(p):
    ids, tables, grad, actual = _dropped(p)
    keep = actual[0] != 0  # LayerNorm outputs are never exactly 0 here: zeros are dropped elements
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)

    def masked(*args, **kwargs):
        return torch.where(keep, reference.embeddings(*args[:-2], 0.0, False, **kwargs) / (1 - p), 0.0)

    expected = run(masked, ids, tables, grad)
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(e.abs().max().item(), 1.0),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_ops_routes_to_the_kernel_under_the_triton_backend():
    ids, tables = make_ids(10), [t.requires_grad_() for t in make_tables(32)]
    with ops.use_backend("triton"):
        backend, fn = ops.implementation("embeddings", tables[0])
        y = ops.embeddings(*ids, *tables, EPS, 0.0, False, padding_idx=0)
    assert backend == "triton" and fn is kernel.embeddings
    assert "bertfast_embeddings_triton" in type(y.grad_fn).__name__
    torch.testing.assert_close(y, reference.embeddings(*ids, *tables, EPS, 0.0, False, padding_idx=0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [768, 1024])
def test_cuda_matches_reference(hidden, dtype):
    check(make_ids(4096, "cuda"), make_tables(hidden, DTYPES[dtype], "cuda"))

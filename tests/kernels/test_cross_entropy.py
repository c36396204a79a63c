"""Fused linear + softmax cross-entropy (Triton kernel, chunked torch version) against the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_relative_rule, sum_rounding_bound, unit_roundoff

from bertfast import ops
from bertfast.common import chunked_loss
from bertfast.kernels import cross_entropy as ce
from bertfast.ops import chunked_cross_entropy as chunked
from bertfast.ops import reference

IMPLS = {"triton": ce.linear_cross_entropy, "torch": chunked.linear_cross_entropy}
IGNORE = -100


def make_inputs(rows: int, vocab: int, hidden: int = 32, dtype=torch.float32, bias: bool = True):
    x = torch.randn(rows, hidden)
    weight = torch.randn(vocab, hidden) * 0.5
    b = torch.randn(vocab) if bias else None
    labels = torch.randint(0, vocab, (rows,))
    if rows:
        # Some rows right on purpose, the vocabulary's edges, and ignored rows.
        logits = x @ weight.T + (b if bias else 0)
        labels[2::3] = logits.argmax(1)[2::3]
        labels[0] = vocab - 1
        labels[1 % rows] = 0
        labels[3::4] = IGNORE
    params = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, weight, b)]
    return *params, labels


def default_grad_out(reduction: str, rows: int) -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, rows) if reduction == "none" else torch.tensor(1.7)


def run(fn, x, weight, bias, labels, grad_out=None, **kwargs):
    """(loss, n_correct, grad_x, grad_weight, grad_bias) after a backward with ``grad_out``."""
    loss, n_correct = fn(x, weight, bias, labels, **kwargs)
    if grad_out is None:
        grad_out = default_grad_out("none" if loss.dim() else "mean", len(x)).to(loss.device)
    inputs = [t for t in (x, weight, bias) if t is not None]
    grads = list(torch.autograd.grad(loss, inputs, grad_out))
    grad_bias = grads.pop() if bias is not None else None
    return loss.detach(), n_correct, grads[0], grads[1], grad_bias


def gradient_error_bounds(x, weight, bias, labels, grad_out=None, reduction="mean", label_smoothing=0.0):
    """Elementwise bounds on how far two fp32 implementations' (grad_x, grad_weight, grad_bias) may differ.

    Each gradient sums products of g = s * (p - t) (s: the row's share of grad_out, p: softmax, t: the
    target distribution) with x or weight: over the vocabulary for grad_x, over the rows for the others.
    Two errors add up: the sum's rounding (``sum_rounding_bound``, over the terms before p - t cancels),
    and each term's own error, that of p = exp(logit - logsumexp): the logit is a sum over the hidden
    size, the logsumexp over the vocabulary. The bound is four times their sum (see sum_rounding_bound)."""
    rows, vocab = len(x), len(weight)
    hidden = x.shape[1]
    grad_out = default_grad_out(reduction, rows) if grad_out is None else grad_out
    x64, w64 = x.detach().double(), weight.detach().double()
    b64 = bias.detach().double() if bias is not None else torch.zeros(vocab, dtype=torch.float64)
    valid = (labels != IGNORE).double()[:, None]
    if reduction == "none":
        share = grad_out.double().abs()[:, None]
    else:
        share = torch.full((rows, 1), abs(float(grad_out)))
        if reduction == "mean":
            share = share / valid.sum().clamp_min(1)
    share = share * valid
    p = (x64 @ w64.T + b64).softmax(1)
    target = label_smoothing / vocab + (1 - label_smoothing) * F.one_hot(labels.clamp_min(0), vocab).double()
    terms = share * (p + target)
    u = unit_roundoff(torch.float32)
    abs_logit = x64.abs() @ w64.abs().T + b64.abs()
    p_error = u * (math.sqrt(hidden) * (abs_logit + abs_logit.amax(1, keepdim=True)) + math.sqrt(vocab))
    term_error = share * p * p_error
    bounds = (
        sum_rounding_bound(terms @ w64.abs(), vocab) + term_error @ w64.abs(),
        sum_rounding_bound(terms.T @ x64.abs(), rows) + term_error.T @ x64.abs(),
        sum_rounding_bound(terms.sum(0), rows) + term_error.sum(0),
    )
    return tuple(4 * b for b in bounds)


def assert_same(actual, expected, rtol=1e-4, gradient_bounds=None):
    """Loss and n_correct within ``rtol``; the gradients within ``gradient_bounds`` where given (from
    ``gradient_error_bounds``), else within ``rtol``."""
    names = ("loss", "n_correct", "grad_x", "grad_weight", "grad_bias")
    bounds = (None, None, *(gradient_bounds or (None, None, None)))
    for name, a, e, bound in zip(names, actual, expected, bounds, strict=True):
        if e is None:
            assert a is None, name
            continue
        assert torch.isfinite(a.float()).all(), name
        if bound is not None:
            excess = (a.double() - e.double()).abs() - bound
            worst = int(excess.argmax()) if excess.numel() else 0
            assert not excess.numel() or excess.max() <= 0, (
                f"{name}: |{a.flatten()[worst]:.6e} - {e.flatten()[worst]:.6e}| exceeds the bound "
                f"{bound.flatten()[worst]:.3e} at flat index {worst}"
            )
            continue
        scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
        atol = rtol * 0.1 * scale
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows,vocab", [(20, 7), (33, 1000), (4, 30522)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_reference(impl, rows, vocab, reduction, smoothing):
    x, weight, bias, labels = make_inputs(rows, vocab)
    kwargs = dict(ignore_index=IGNORE, label_smoothing=smoothing, reduction=reduction)
    grad_out = torch.randn(rows) if reduction == "none" else torch.tensor(1.7)
    expected = run(reference.linear_cross_entropy, x, weight, bias, labels, grad_out, **kwargs)
    assert expected[1] > 0
    bounds = gradient_error_bounds(x, weight, bias, labels, grad_out, reduction, smoothing)
    assert_same(run(IMPLS[impl], x, weight, bias, labels, grad_out, **kwargs), expected, gradient_bounds=bounds)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_bias(impl):
    x, weight, _, labels = make_inputs(10, 300, bias=False)
    expected = run(reference.linear_cross_entropy, x, weight, None, labels)
    bounds = gradient_error_bounds(x, weight, None, labels)
    assert_same(run(IMPLS[impl], x, weight, None, labels), expected, gradient_bounds=bounds)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_valid_row(impl, reduction):
    x, weight, bias, labels = make_inputs(9, 500)
    labels[:] = IGNORE
    labels[4] = 17
    grad_out = torch.randn(9) if reduction == "none" else torch.tensor(1.7)
    expected = run(reference.linear_cross_entropy, x, weight, bias, labels, grad_out, reduction=reduction)
    bounds = gradient_error_bounds(x, weight, bias, labels, grad_out, reduction)
    actual = run(IMPLS[impl], x, weight, bias, labels, grad_out, reduction=reduction)
    assert_same(actual, expected, gradient_bounds=bounds)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows", [0, 6])
def test_no_valid_row_gives_zero_loss_and_gradients(impl, reduction, rows):
    x, weight, bias, labels = make_inputs(rows, 300)
    labels[:] = IGNORE
    loss, n_correct, grad_x, grad_w, grad_b = run(IMPLS[impl], x, weight, bias, labels, reduction=reduction)
    assert n_correct.item() == 0
    for t in (loss, grad_x, grad_w, grad_b):
        assert torch.isfinite(t).all()
        assert not t.any()
    assert grad_x.shape == x.shape and grad_w.shape == weight.shape and grad_b.shape == bias.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("rows_per_chunk", [1, 3])
def test_small_chunks_match_one_chunk(impl, reduction, rows_per_chunk):
    x, weight, bias, labels = make_inputs(11, 1000)
    grad_out = torch.randn(11) if reduction == "none" else torch.tensor(1.7)
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    whole = run(IMPLS[impl], x, weight, bias, labels, grad_out, **kwargs)
    chunk_bytes = rows_per_chunk * 1000 * 4
    chunked = run(IMPLS[impl], x, weight, bias, labels, grad_out, chunk_bytes=chunk_bytes, **kwargs)
    assert_same(chunked, whole, rtol=1e-5)


def test_chunk_size_from_argument_environment_and_default(monkeypatch):
    monkeypatch.delenv(chunked_loss.CHUNK_BYTES_ENV, raising=False)
    assert chunked_loss.chunk_rows(4000, 30522 * 2) == 4000  # BERT pretraining's masked rows: one chunk by default
    assert chunked_loss.chunk_rows(10, 100, chunk_bytes=300) == 3  # 3 rows fit: 4 chunks
    assert chunked_loss.chunk_rows(10, 100, chunk_bytes=800) == 5  # 8 rows fit: 2 chunks, spread evenly
    monkeypatch.setenv(chunked_loss.CHUNK_BYTES_ENV, "250")
    assert chunked_loss.chunk_rows(10, 100) == 2
    assert chunked_loss.chunk_rows(10, 100, chunk_bytes=1000) == 10
    assert chunked_loss.chunk_rows(10, 100, chunk_bytes=1) == 1


@pytest.mark.parametrize("dtype,row_bytes", [(torch.float32, 100 * 4), (torch.bfloat16, 100 * (2 + 4))])
def test_chunks_stay_within_the_memory_bound(monkeypatch, dtype, row_bytes):
    """fp32 chunks hold their logits; bf16 chunks their logits and an fp32 work copy."""
    seen = []
    real = chunked._softmax_xent_torch

    def spy(logits, *args):
        seen.append(logits.shape[0])
        return real(logits, *args)

    monkeypatch.setattr(chunked, "_softmax_xent_torch", spy)
    x, weight, bias, labels = make_inputs(23, 100, dtype=dtype)
    monkeypatch.setenv(chunked_loss.CHUNK_BYTES_ENV, str(5 * row_bytes + row_bytes // 2))
    chunked.linear_cross_entropy(x, weight, bias, labels)[0].backward()
    assert sum(seen) == 23 and max(seen) <= 5 and len(seen) == 5
    seen.clear()
    monkeypatch.delenv(chunked_loss.CHUNK_BYTES_ENV)
    chunked.linear_cross_entropy(x, weight, bias, labels)
    assert seen == [23]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,vocab,chunk_bytes", [(24, 1000, None), (24, 1000, 8 * 1000 * 2), (3, 30522, None)]
)
def test_reduced_precision_relative_rule(impl, dtype, rows, vocab, chunk_bytes):
    x, weight, bias, labels = make_inputs(rows, vocab, hidden=48)
    kwargs = dict(label_smoothing=0.1)
    expected = run(reference.linear_cross_entropy, x, weight, bias, labels, **kwargs)
    low = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias)]
    same_dtype = run(reference.linear_cross_entropy, *low, labels, **kwargs)
    actual = run(IMPLS[impl], *low, labels, chunk_bytes=chunk_bytes, **kwargs)
    for name, a, fp32, ref_low in zip(("loss", "", "grad_x", "grad_weight", "grad_bias"), actual, expected,
                                      same_dtype, strict=True):
        if name:
            assert a.dtype == ref_low.dtype, name
            assert_relative_rule(a.float(), fp32, ref_low.float(), atol=1e-3, name=name)
    assert abs(actual[1].item() - same_dtype[1].item()) <= 1  # argmax of rounded logits: a near-tie may flip


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_keeps_small_probabilities_under_a_loss_scale(impl):
    """Near-uniform softmax over 30522 words, / 64 rows: below fp16's range unless scaled up first."""
    x, weight, bias, labels = make_inputs(64, 30522, hidden=16)
    weight, bias = (t.detach().mul(0.01).requires_grad_() for t in (weight, bias))
    grad_out = torch.tensor(1024.0)  # what a loss scaler passes
    expected = run(reference.linear_cross_entropy, x, weight, bias, labels, grad_out)
    low = [t.detach().half().requires_grad_() for t in (x, weight, bias)]
    same_dtype = run(reference.linear_cross_entropy, *low, labels, grad_out)
    actual = run(IMPLS[impl], *low, labels, grad_out)
    for name, i in (("grad_x", 2), ("grad_weight", 3), ("grad_bias", 4)):
        assert_relative_rule(actual[i].float(), expected[i], same_dtype[i].float(), atol=1e-4, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_runs_the_matmuls_in_bf16(impl):
    x, weight, bias, labels = make_inputs(24, 700, hidden=64)
    expected = run(reference.linear_cross_entropy, x, weight, bias, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_dtype = run(reference.linear_cross_entropy, x, weight, bias, labels)
        actual = run(IMPLS[impl], x, weight, bias, labels)
    for name, i in (("loss", 0), ("grad_x", 2), ("grad_weight", 3), ("grad_bias", 4)):
        assert actual[i].dtype == torch.float32, name
        assert_relative_rule(actual[i], expected[i], same_dtype[i], atol=1e-3, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_twice_with_retained_graph(impl):
    x, weight, bias, labels = make_inputs(8, 200)
    loss, _ = IMPLS[impl](x, weight, bias, labels)
    first = torch.autograd.grad(loss, (x, weight, bias), retain_graph=True)
    second = torch.autograd.grad(loss, (x, weight, bias))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_without_gradients(impl):
    x, weight, bias, labels = make_inputs(12, 300)
    expected, expected_correct = reference.linear_cross_entropy(x, weight, bias, labels)
    with torch.no_grad():
        loss, n_correct = IMPLS[impl](x, weight, bias, labels)
    assert not loss.requires_grad and n_correct == expected_correct
    torch.testing.assert_close(loss, expected.detach())


@pytest.mark.parametrize("xent", [ce._softmax_xent_triton, chunked._softmax_xent_torch])
def test_kernel_ties_pick_the_first_maximum_and_gradient_is_softmax_minus_onehot(xent):
    vocab = 5000  # two blocks of 4096: ties within one lane (100, 4196) and across lanes (100, 4300)
    logits = torch.randn(4, vocab)
    logits[:, [100, 4196, 4300]] = 10.0
    labels = torch.tensor([100, 4196, 4300, IGNORE])
    scale = torch.tensor([0.5])
    loss = torch.empty(4)
    correct = torch.empty(4, dtype=torch.int32)
    expected_grad = (torch.softmax(logits, 1) - torch.nn.functional.one_hot(labels.clamp(min=0), vocab)) * 0.5
    expected_grad[3] = 0
    expected_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    grad = xent(logits, labels, scale, IGNORE, 0.0, loss, correct)
    assert correct.tolist() == [1, 0, 0, 0]
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_unknown_reduction_is_rejected():
    x, weight, bias, labels = make_inputs(4, 10)
    with pytest.raises(ValueError, match="reduction"):
        chunked.linear_cross_entropy(x, weight, bias, labels, reduction="max")


def test_triton_backend_routes_to_the_kernel():
    x, weight, bias, labels = make_inputs(16, 1000)
    with ops.use_backend("triton"):
        backend, fn = ops.implementation("linear_cross_entropy", x)
        actual = run(ops.linear_cross_entropy, x, weight, bias, labels, label_smoothing=0.1)
    assert backend == "triton" and fn is ce.linear_cross_entropy
    expected = run(reference.linear_cross_entropy, x, weight, bias, labels, label_smoothing=0.1)
    assert_same(actual, expected, gradient_bounds=gradient_error_bounds(x, weight, bias, labels, label_smoothing=0.1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [None, 100 * 30522 * 2])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bert_shapes(dtype, chunk_bytes, reduction):
    x, weight, bias, labels = make_inputs(614, 30522, hidden=768)
    x, weight, bias = (t.detach().cuda().requires_grad_() for t in (x, weight, bias))
    labels = labels.cuda()
    grad_out = torch.randn(614, device="cuda") if reduction == "none" else None
    expected = run(reference.linear_cross_entropy, x, weight, bias, labels, grad_out, reduction=reduction)
    low = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias)]
    same_dtype = run(reference.linear_cross_entropy, *low, labels, grad_out, reduction=reduction)
    actual = run(
        ce.linear_cross_entropy, *low, labels, grad_out, reduction=reduction, chunk_bytes=chunk_bytes
    )
    for name, i in (("loss", 0), ("grad_x", 2), ("grad_weight", 3), ("grad_bias", 4)):
        assert_relative_rule(actual[i].float(), expected[i], same_dtype[i].float(), atol=1e-4, name=name)

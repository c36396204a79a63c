"""The native CPU dropout: its mask's statistics, its gradients, and the ops that use it against the references."""

from __future__ import annotations

import math

import pytest
import torch

from bertfast import ops
from bertfast.common.dropout import draw_seed
from bertfast.ops import dropout, native, reference


def keep_mask(shape, p: float, seed, rows=None) -> torch.Tensor:
    """What the kernel keeps: its hashes of (seed, row, column) shifted and compared with the threshold."""
    rows = torch.arange(math.prod(shape[:-1])) if rows is None else rows
    bits = native.dropout_bits(torch.as_tensor(seed), rows, shape[-1])
    return ((bits >> 1) >= dropout.threshold(p)).view(shape)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keeps_one_minus_p_scaled_and_matches_its_hashes(p):
    x = torch.randn(257, 1001)
    y = native.dropout(x, p, True, seed=torch.tensor(7))
    kept = keep_mask(x.shape, p, 7)
    torch.testing.assert_close(y, torch.where(kept, x * (1 / (1 - p)), 0.0), rtol=0, atol=0)
    n = x.numel()
    assert abs(kept.sum().item() - (1 - p) * n) < 6 * math.sqrt(n * p * (1 - p))  # binomial, 6 sigma


def test_mask_has_no_visible_structure():
    kept = keep_mask((1024, 1024), 0.5, 3).float()
    centred = kept - kept.mean()
    for lag in (1, 2, 16, 256):  # neighbours, vector lanes, further along a row; and the same across rows
        along_row = (centred[:, :-lag] * centred[:, lag:]).mean() / centred.var()
        across_rows = (centred[:-lag] * centred[lag:]).mean() / centred.var()
        assert abs(along_row) < 0.01 and abs(across_rows) < 0.01, lag
    for axis in (0, 1):  # every row and every column keeps about half
        assert (kept.mean(dim=axis) - 0.5).abs().max() < 6 * math.sqrt(0.25 / 1024)
    other = keep_mask((1024, 1024), 0.5, 4).float()  # another seed: an independent mask
    assert abs((kept == other).float().mean().item() - 0.5) < 0.01
    high = keep_mask((1024, 1024), 0.5, 3 + 2**32).float()  # the seed's high word counts too
    assert abs((kept == high).float().mean().item() - 0.5) < 0.01


def test_the_kernel_and_the_shared_pytorch_rule_agree_bit_for_bit():
    rows = torch.tensor([0, 1, 2, 1000, 2**31 - 1, 2**31, 2**32 - 1, 12345678901])  # ids taken mod 2**32
    for seed in (0, 1, 2**61 + 12345):
        for p in (0.0, 0.1, 0.5, 1.0):
            expected = dropout.keep_mask(torch.tensor(seed), rows, 300, p)
            assert torch.equal(keep_mask((len(rows), 300), p, seed, rows), expected), (seed, p)


def test_seed_from_torch_generator_repeats_and_backward_uses_the_same_mask():
    x = torch.randn(64, 96, requires_grad=True)
    torch.manual_seed(5)
    y1 = native.dropout(x, 0.3, True)
    torch.manual_seed(5)
    y2 = native.dropout(x, 0.3, True)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, native.dropout(x, 0.3, True))
    dy = torch.randn_like(y1)
    (dx,) = torch.autograd.grad(y1, x, dy)
    torch.testing.assert_close(dx, torch.where(y1 != 0, dy * (1 / 0.7), 0.0), rtol=0, atol=0)


def test_edge_probabilities_dtypes_and_bad_input():
    x = torch.randn(5, 3, requires_grad=True)
    assert native.dropout(x, 0.0, True) is x and native.dropout(x, 0.5, False) is x
    y = native.dropout(x, 1.0, True)
    assert torch.equal(y, torch.zeros_like(x))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(dx, torch.zeros_like(x))
    half = torch.randn(4, 4, dtype=torch.float16)  # not for the native kernels: the dispatcher picks the reference
    assert ops.implementation("bias_dropout_add_layernorm", half)[0] == "torch"
    assert ops.implementation("bias_dropout_add_layernorm", half.bfloat16())[0] == "native"
    mixed = (half.bfloat16(), None, half.float())  # activations of two dtypes: the reference too
    assert ops.implementation("bias_dropout_add_layernorm", *mixed)[0] == "torch"
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native.dropout(half, 0.5, True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        native.dropout(x, 1.5, True)
    strided = torch.randn(6, 8).t()  # non-contiguous input: same values as its contiguous copy
    assert torch.equal(native.dropout(strided, 0.5, True, seed=torch.tensor(1)),
                       native.dropout(strided.contiguous(), 0.5, True, seed=torch.tensor(1)))


def test_residual_and_embedding_ops_equal_the_reference_with_the_same_mask():
    torch.manual_seed(0)
    x, res = torch.randn(13, 48, requires_grad=True), torch.randn(13, 48, requires_grad=True)
    bias, w, b = (torch.randn(48, requires_grad=True) for _ in range(3))
    assert ops.implementation("bias_dropout_add_layernorm", x)[0] == "native"
    torch.manual_seed(1)
    y = ops.bias_dropout_add_layernorm(x, bias, res, w, b, 1e-12, 0.2, True)
    torch.manual_seed(1)
    mask = keep_mask(x.shape, 0.2, draw_seed(torch.device("cpu")))
    h = torch.where(mask, (x + bias) / 0.8, 0.0) + res
    expected = torch.nn.functional.layer_norm(h, (48,), w, b, 1e-12)
    torch.testing.assert_close(y, expected)
    torch.manual_seed(1)  # the reference draws the same seed and keeps the same elements
    torch.testing.assert_close(y, reference.bias_dropout_add_layernorm(x, bias, res, w, b, 1e-12, 0.2, True))
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, res, bias, w, b), dy),
                         torch.autograd.grad(expected, (x, res, bias, w, b), dy), strict=True):
        torch.testing.assert_close(got, want)

    ids, pos, types = torch.randint(0, 50, (13,)), torch.arange(13), torch.zeros(13, dtype=torch.long)
    tables = [torch.randn(50, 48), torch.randn(16, 48), torch.randn(2, 48)]
    torch.manual_seed(2)
    out = ops.embeddings(ids, pos, types, *tables, w, b, 1e-12, 0.1, True)
    torch.manual_seed(2)
    mask = keep_mask((13, 48), 0.1, draw_seed(torch.device("cpu")))
    plain = reference.embeddings(ids, pos, types, *tables, w, b, 1e-12, 0.1, False)
    torch.testing.assert_close(out, torch.where(mask, plain / 0.9, 0.0))


def test_attention_in_training_equals_the_masked_softmax_reference():
    lengths = [1, 7, 0, 5]
    cu = torch.tensor([0, 1, 8, 8, 13], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, 2, 8, requires_grad=True)
    assert ops.implementation("attention", qkv)[0] == "native"
    torch.manual_seed(3)
    out = ops.attention(qkv, cu, max(lengths), 0.25, training=True)
    torch.manual_seed(3)
    seed = draw_seed(torch.device("cpu"))
    expected = []
    for i, n in enumerate(lengths):  # per sequence: softmax over its own keys, the same kept probabilities
        q, k, v = qkv[cu[i]:cu[i] + n].unbind(1)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(8), dim=-1)
        # Probability (head h, query q, key k) is row (token of q) * heads + h, column k of the mask.
        rows = ((cu[i] + torch.arange(n))[None, :] * 2 + torch.arange(2)[:, None]).reshape(-1)
        probs = torch.where(keep_mask((2, n, n), 0.25, seed, rows), probs / 0.75, 0.0)
        expected.append(torch.einsum("hqk,khd->qhd", probs, v))
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected)
    dy = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, dy)[0], torch.autograd.grad(expected, qkv, dy)[0])
    torch.manual_seed(3)  # a looser bound than the longest sequence keeps the same mask
    torch.testing.assert_close(ops.attention(qkv, cu, 11, 0.25, training=True), out)
    # Without dropout (or in eval) it is the reference itself.
    torch.testing.assert_close(ops.attention(qkv, cu, 7, 0.25, training=False), reference.attention(qkv, cu, 7))


def test_padded_attention_keeps_padding_rows_zero_in_training():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    q, k, v = (torch.randn(2, 4, 2, 8) for _ in range(3))
    out = ops.padded_attention(q, k, v, mask, 0.5, training=True)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert (out[mask] != 0).any()

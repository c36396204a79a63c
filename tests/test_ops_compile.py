"""Every op of ``bertfast.ops`` inside ``torch.compile(fullgraph=True)``: no graph break, with a packed
token count that is an unbacked size (from ``torch.nonzero``, as the model packs), forward and backward
equal to eager."""

from __future__ import annotations

import pytest
import torch

from bertfast import ops
from bertfast.common.library import TRITON_INTERPRETED

HIDDEN, HEADS, VOCAB, INTERMEDIATE = 32, 2, 50, 64


def encoder_step(input_ids, attention_mask, labels, params, training: bool):
    """Pack with nonzero, then one pass through every op: the shape of a BERT layer and its MLM loss."""
    word, pos, types, ln_w, ln_b, w_qkv, b_qkv, w_o, b_o, w_i, b_i, w_out, w_t, b_t = params
    batch, seqlen = attention_mask.shape
    kept = torch.nonzero(attention_mask.flatten()).flatten()  # (T,): T is data-dependent
    ids = input_ids.flatten().index_select(0, kept)
    positions = torch.arange(seqlen).repeat(batch).index_select(0, kept)
    lengths = attention_mask.sum(1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    p = 0.1 if training else 0.0
    h = ops.embeddings(ids, positions, torch.zeros_like(ids), word, pos, types, ln_w, ln_b, 1e-12, p, training,
                       padding_idx=0)
    qkv = (h @ w_qkv.T + b_qkv).view(-1, 3, HEADS, HIDDEN // HEADS)
    context = ops.attention(qkv, cu_seqlens, seqlen, p, training).reshape(-1, HIDDEN)  # the padded width: a bound
    h = ops.bias_dropout_add_layernorm(context @ w_o.T, b_o, h, ln_w, ln_b, 1e-12, p, training)
    inner = ops.bias_gelu(h @ w_i.T, b_i)
    h = ops.bias_dropout_add_layernorm(inner @ w_out.T, None, h, ln_w, ln_b, 1e-12, p, training)  # bias None
    head = ops.bias_gelu_layernorm(h @ w_t.T, b_t, ln_w, ln_b, 1e-12)
    loss, n_correct = ops.linear_cross_entropy(head, word, None, labels.flatten().index_select(0, kept))
    return loss, n_correct


def make_inputs():
    torch.manual_seed(0)
    shapes = [(VOCAB, HIDDEN), (16, HIDDEN), (2, HIDDEN), (HIDDEN,), (HIDDEN,), (3 * HIDDEN, HIDDEN), (3 * HIDDEN,),
              (HIDDEN, HIDDEN), (HIDDEN,), (INTERMEDIATE, HIDDEN), (INTERMEDIATE,), (HIDDEN, INTERMEDIATE),
              (HIDDEN, HIDDEN), (HIDDEN,)]
    params = [0.2 * torch.randn(shape) for shape in shapes]
    params[3] += 1.0
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [0] * 9])  # a full row, a short one and an empty one
    ids = torch.randint(1, VOCAB, mask.shape)
    labels = torch.where(torch.rand(mask.shape) < 0.5, ids, ops.IGNORE_INDEX)
    return ids, mask, labels, [p.requires_grad_() for p in params]


def run(fn, inputs, training=False):
    ids, mask, labels, params = inputs
    loss, n_correct = fn(ids, mask, labels, params, training)
    return loss.detach(), n_correct, torch.autograd.grad(loss, params)


@pytest.fixture(autouse=True)
def _dynamic_output_shapes():
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch._dynamo.reset()
        yield
        torch._dynamo.reset()


# fullgraph=True: any graph break is an error. aot_eager: AOTAutograd traces forward and backward with
# fake tensors and the unbacked T, as Inductor's input is (Inductor's own code generation costs a minute
# per graph on 2 cores; it gives the same numbers).
@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_compiled_step_has_no_graph_break_and_equals_eager(backend, one_thread):
    if backend == "triton" and not TRITON_INTERPRETED:
        pytest.skip("needs the Triton interpreter")
    inputs = make_inputs()
    with ops.use_backend(backend):
        assert {ops.implementation(op, inputs[3][0])[0] for op in ops.dispatch.OPS} <= {backend, "torch"}
        eager = run(encoder_step, inputs)
        compiled = run(torch.compile(encoder_step, fullgraph=True, backend="aot_eager"), inputs)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    assert compiled[1] == eager[1]
    for got, want in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["native"])
def test_compiled_training_step_draws_its_seeds_in_the_graph(backend, one_thread):
    """With dropout: no graph break, and (aot_eager draws as eager does) the same masks as eager."""
    inputs = make_inputs()
    with ops.use_backend(backend):
        torch.manual_seed(3)
        eager = run(encoder_step, inputs, training=True)
        torch.manual_seed(3)
        compiled = run(torch.compile(encoder_step, fullgraph=True, backend="aot_eager"), inputs, training=True)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

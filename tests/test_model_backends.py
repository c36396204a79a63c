"""The whole model through each backend: the same loss and every gradient as the reference backend.

Without a GPU the Triton kernels run in the interpreter (set up by conftest), so this checks that
every kernel is wired into the model with the right arguments, on ragged batches.
"""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import BertConfig, ops

pytest.importorskip("triton")


def run(model, backend: str, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with ops.use_backend(backend):
        out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_pretraining_step_matches_reference_backend(backend):
    # head_dim 32 (a size the attention kernel takes); hidden 64 and odd lengths.
    config = BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=96, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = bertfast.BertForPreTraining(config).train()
    lengths = torch.tensor([1, 7, 0, 19])
    ids = torch.randint(0, 101, (4, 19))
    mask = (torch.arange(19)[None, :] < lengths[:, None]).long()
    labels = torch.where((torch.rand(4, 19) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100))
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 1, 0]))

    with ops.use_backend(backend):
        chosen = {op: ops.implementation(op, ids.float())[0] for op in ops.dispatch.OPS}
    expected = {op: backend for op in ops.dispatch.OPS if backend in ops.dispatch.backends_of(op)}
    assert expected and {op: chosen[op] for op in expected} == expected

    ref_loss, ref_grads = run(model, "torch", batch)
    loss, grads = run(model, backend, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

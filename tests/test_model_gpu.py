"""The whole model on a GPU: the default (Triton) backend against the reference, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_relative_rule

import bertfast
from bertfast import BertConfig, ops

pytestmark = pytest.mark.gpu


def batch(device: torch.device, vocab: int):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 7, 127, 128, 64, 0, 100, 128])
    ids = torch.randint(0, vocab, (8, 128), generator=g)
    mask = (torch.arange(128)[None, :] < lengths[:, None]).long()
    labels = torch.where((torch.rand(8, 128, generator=g) < 0.15) & mask.bool(), ids, torch.full_like(ids, -100))
    nsp = torch.randint(0, 2, (8,), generator=g)
    tensors = dict(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    return {k: v.to(device) for k, v in tensors.items()}


def step(model, inputs, backend: str | None, dtype: torch.dtype):
    model.zero_grad(set_to_none=True)
    with ops.use_backend(backend), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = model(**inputs)
    out.loss.backward()
    return out.loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_default_backend_on_cuda_matches_reference(dtype):
    device = torch.device("cuda")
    config = BertConfig.from_preset("mini", vocab_size=1000, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = bertfast.BertForPreTraining(config).to(device).train()
    inputs = batch(device, config.vocab_size)
    assert ops.implementation("attention", inputs["input_ids"].float())[0] == "triton"
    loss32, grads32 = step(model, inputs, "torch", torch.float32)
    loss_ref, grads_ref = step(model, inputs, "torch", dtype)
    loss, grads = step(model, inputs, None, dtype)
    assert_relative_rule(loss, loss32, loss_ref, atol=1e-3, name="loss")
    for name in grads32:
        assert_relative_rule(grads[name], grads32[name], grads_ref[name], atol=1e-4, name=name)

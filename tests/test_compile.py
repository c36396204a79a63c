"""torch.compile on bertfast's models: no graph breaks, eager numerics, and few recompiles on ragged batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

import bertfast
from bertfast import BertConfig

CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "BertForMultipleChoice"]


def config() -> BertConfig:
    return BertConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, num_labels=3)


def inputs_for(name: str, rows: int = 4, seqlen: int = 11, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seqlen + 1, (rows,), generator=g)
    lengths[0] = seqlen
    ids = torch.randint(1, 64, (rows, seqlen), generator=g)
    mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    batch = dict(input_ids=ids, attention_mask=mask)
    if name in ("BertForPreTraining", "BertForMaskedLM"):
        batch["labels"] = torch.where((torch.rand(rows, seqlen, generator=g) < 0.3) & mask.bool(), ids, -100)
    if name == "BertForPreTraining":
        batch["next_sentence_label"] = torch.randint(0, 2, (rows,), generator=g)
    if name in ("BertForNextSentencePrediction",):
        batch["labels"] = torch.randint(0, 2, (rows,), generator=g)
    if name == "BertForSequenceClassification":
        batch["labels"] = torch.randint(0, 3, (rows,), generator=g)
    if name == "BertForTokenClassification":
        batch["labels"] = torch.where(mask.bool(), torch.randint(0, 3, (rows, seqlen), generator=g), -100)
    if name == "BertForQuestionAnswering":
        batch["start_positions"] = torch.randint(0, seqlen, (rows,), generator=g)
        batch["end_positions"] = torch.randint(0, seqlen, (rows,), generator=g)
    if name == "BertForMultipleChoice":
        batch = {k: v.view(2, rows // 2, seqlen) for k, v in batch.items()}
        batch["labels"] = torch.randint(0, rows // 2, (2,), generator=g)
    return batch


def build(name: str) -> torch.nn.Module:
    cfg = config()
    if name == "BertForQuestionAnswering":
        cfg = BertConfig.from_dict({**cfg.to_dict(), "num_labels": 2, "id2label": None, "label2id": None})
    return getattr(bertfast, name)(cfg)


def scalar(out) -> torch.Tensor:
    """One number from every output a model returns (the loss when there is one)."""
    if getattr(out, "loss", None) is not None:
        return out.loss
    return sum(v.float().sum() for v in out.to_tuple() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("mode", ["inference", "training step"])
def test_no_graph_breaks(name, mode, one_thread):
    model = build(name).train(mode == "training step")
    batch = inputs_for(name)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda: scalar(model(**batch)))()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name", CLASSES)
def test_fullgraph_training_step_equals_eager(name, one_thread):
    torch._dynamo.reset()
    eager = build(name).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    batch = inputs_for(name)
    expected, got = scalar(eager(**batch)), scalar(compiled(**batch))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.backward()
    got.backward()
    for (param_name, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), param_name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=param_name: f"{n}: {m}")


def test_inductor_compiled_inference_equals_eager(one_thread):
    torch._dynamo.reset()
    model = build("BertForSequenceClassification").eval()
    compiled = torch.compile(model, fullgraph=True)
    for seed in range(2):
        batch = inputs_for("BertForSequenceClassification", seed=seed)
        batch.pop("labels")
        with torch.no_grad():
            torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)


def test_a_stream_of_ragged_shapes_compiles_at_most_two_graphs(one_thread):
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = build("BertModel").eval()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    for rows, seqlen in [(4, 11), (3, 17), (6, 9), (2, 30), (5, 13)]:
        batch = inputs_for("BertModel", rows=rows, seqlen=seqlen, seed=rows)
        with torch.no_grad():
            got = compiled(**batch).last_hidden_state
            torch.testing.assert_close(got, model(**batch).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(graphs) <= 2

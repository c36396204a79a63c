"""Converting a live transformers model: same class, config and weights, same outputs."""

from __future__ import annotations

import pytest
import torch
import transformers

import bertfast

CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "BertForMultipleChoice"]


@pytest.mark.parametrize("name", CLASSES)
def test_converted_model_gives_transformers_outputs(name):
    config = transformers.BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=50, max_position_embeddings=24, num_labels=2)
    torch.manual_seed(0)
    theirs = getattr(transformers, name)(config).eval()
    ours = bertfast.from_transformers(theirs)
    assert type(ours) is getattr(bertfast, name) and not ours.training
    ids = torch.randint(0, 80, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    if name == "BertForMultipleChoice":
        ids, mask = ids.view(1, 3, 11), mask.view(1, 3, 11)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), theirs(ids, attention_mask=mask)
    real = mask.bool().view(3, 11)
    for key in b.keys():
        x, y = a[key], b[key]
        if x.dim() >= 2 and x.shape[:2] == (3, 11):  # per-token outputs: compare real tokens
            x, y = x[real], y[real]
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"{name}.{key}")


def test_unsupported_model_is_named():
    with pytest.raises(TypeError, match="cannot convert Linear"):
        bertfast.from_transformers(torch.nn.Linear(2, 2))

"""Bad input gets a clear error that names the problem, never a crash, NaN or a silent wrong answer."""

from __future__ import annotations

import pytest
import torch

import bertfast
from bertfast import BertConfig, BertForTokenClassification, BertModel


@pytest.fixture(scope="module")
def model():
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=12, type_vocab_size=2)
    return bertfast.BertForPreTraining(config).eval()


def ids(batch=2, seqlen=6):
    return torch.randint(0, 50, (batch, seqlen))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(input_ids=torch.tensor([[1, 2, 50]])), r"input_ids holds 50, outside \[0, 50\)"),
        (dict(input_ids=torch.tensor([[1, -3, 2]])), r"input_ids holds -3"),
        (dict(input_ids=ids(), token_type_ids=torch.full((2, 6), 2)), r"token_type_ids holds 2, outside \[0, 2\)"),
        (dict(input_ids=ids(seqlen=13)), r"sequence length 13 exceeds max_position_embeddings \(12\)"),
        (dict(input_ids=ids(), position_ids=torch.full((2, 6), 12)), r"position_ids holds 12"),
        (dict(input_ids=ids(), attention_mask=torch.ones(2, 5)), r"attention_mask has shape \(2, 5\)"),
        (dict(input_ids=ids(), attention_mask=torch.ones(2, 1, 6, 6)), r"attention_mask has shape"),
        (dict(input_ids=ids(), attention_mask=torch.full((2, 6), -10000.0)), r"only 0 \(padding\) and 1"),
        (dict(input_ids=ids(), token_type_ids=torch.zeros(2, 5, dtype=torch.long)), r"token_type_ids has shape"),
        (dict(input_ids=torch.randint(0, 50, (6,))), r"input_ids must be \(batch, seq_len\)"),
        (dict(input_ids=ids().float()), r"integer token ids"),
        (dict(), r"exactly one of input_ids or inputs_embeds"),
        (dict(input_ids=ids(), inputs_embeds=torch.zeros(2, 6, 16)), r"exactly one"),
        (dict(inputs_embeds=torch.zeros(2, 6, 15)), r"inputs_embeds must be \(batch, seq_len, 16\)"),
        (dict(input_ids=ids(), labels=torch.full((2, 6), 77)), r"labels holds 77"),
        (dict(input_ids=ids(), labels=torch.full((2, 5), -100)), r"labels has shape \(2, 5\)"),
        (dict(input_ids=ids(), next_sentence_label=torch.tensor([0, 2])), r"next_sentence_label holds 2"),
        (dict(input_ids=ids(), output_attentions=True), r"output_attentions is not supported"),
    ],
)
def test_bad_input_is_named(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_padding_may_hold_any_id(model):
    """Ids at padded positions are never looked up, so they need not be valid."""
    x = torch.tensor([[1, 2, 3, -1, 999]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    out = model(x, attention_mask=mask)
    assert torch.isfinite(out.prediction_logits).all()


def test_all_padding_rows_give_finite_outputs(model):
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    labels = torch.full((2, 6), -100)
    labels[0, 1] = 4
    out = model(ids(), attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1]))
    assert torch.isfinite(out.loss) and torch.isfinite(out.seq_relationship_logits).all()
    base = model.bert(ids(), attention_mask=torch.zeros(2, 6, dtype=torch.long))
    assert torch.isfinite(base.pooler_output).all() and (base.last_hidden_state == 0).all()


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        BertConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        BertConfig(vocab_size=0)
    with pytest.raises(ValueError, match="num_labels=2"):
        bertfast.BertForQuestionAnswering(BertConfig(hidden_size=8, num_attention_heads=2, num_labels=3,
                                                     intermediate_size=8, num_hidden_layers=1))


def test_inputs_on_another_device_than_the_model_are_named():
    model = BertModel(BertConfig.from_preset("tiny", vocab_size=50)).to("meta")
    with pytest.raises(ValueError, match="input_ids is on cpu but the model is on meta"):
        model(torch.tensor([[1, 2, 3]]))


def test_token_classification_labels_of_the_wrong_shape_are_named():
    model = BertForTokenClassification(BertConfig.from_preset("tiny", vocab_size=50, num_labels=3))
    with pytest.raises(ValueError, match=r"labels has shape \(6,\), expected \(2, 3\): one label per token"):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), labels=torch.zeros(6, dtype=torch.long))


@pytest.mark.parametrize("kwargs", [{"torch_dtype": torch.float16}, {"dtype": "float16"}, {"torch_dtype": "float16"}])
def test_from_pretrained_honours_torch_dtype(tmp_path, kwargs):
    BertModel(BertConfig.from_preset("tiny", vocab_size=50)).save_pretrained(tmp_path)
    assert BertModel.from_pretrained(tmp_path, **kwargs).dtype == torch.float16
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        BertModel.from_pretrained(tmp_path, dtype="int8")

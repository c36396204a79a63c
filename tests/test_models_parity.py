"""Every model class against transformers on the same weights: outputs and every parameter gradient."""

from __future__ import annotations

import pytest
import torch
import transformers

import bertfast
from bertfast import BertConfig

# Odd sizes on purpose: hidden not a power of two, head_dim 16, odd vocab and lengths.
LENGTHS = [1, 7, 13, 17]
SEQLEN = 17


def small_config(**overrides) -> BertConfig:
    values = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                  intermediate_size=100, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=3)
    values.update(overrides)
    return BertConfig(**values)


def ragged_batch(lengths=LENGTHS, seqlen=SEQLEN, vocab=99):
    batch = len(lengths)
    ids = torch.randint(0, vocab, (batch, seqlen))  # 0 is [PAD]: its row gets no gradient
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = (torch.arange(seqlen)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    return ids, mask, types


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """fp32 parity: |a - b| <= tol * max(1, max|b|) elementwise."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol * scale:.3e}"


def pair(cls_name: str, config: BertConfig, tmp_path):
    """The bertfast model and transformers' model of the same class, with identical weights."""
    torch.manual_seed(0)
    ours = getattr(bertfast, cls_name)(config)
    ours.save_pretrained(tmp_path)
    theirs, info = getattr(transformers, cls_name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return ours.eval(), theirs.eval()


def check_grads(ours, theirs) -> None:
    checked = 0
    for name, p in ours.named_parameters():
        q = theirs.get_parameter(name)
        if q.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{name}: gradient where transformers has none"
            continue
        assert p.grad is not None, f"{name}: no gradient"
        close(p.grad, q.grad, what=f"grad {name}")
        checked += 1
    assert checked > 10


def run_both(ours, theirs, **inputs):
    out_ours = ours(**inputs)
    out_theirs = theirs(**inputs)
    out_ours.loss.backward()
    return out_ours, out_theirs


def test_bert_model_hidden_states_and_grads(tmp_path):
    ours, theirs = pair("BertModel", small_config(), tmp_path)
    ids, mask, types = ragged_batch()
    a = ours(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    b = theirs(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    real = mask.bool()
    close(a.last_hidden_state[real], b.last_hidden_state[real], what="last_hidden_state")
    close(a.pooler_output, b.pooler_output, what="pooler_output")
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        close(x[real], y[real], what=f"hidden_states[{i}]")
    assert (a.last_hidden_state[~real] == 0).all()
    torch.manual_seed(1)
    weights = torch.randn_like(a.last_hidden_state)
    ((a.last_hidden_state * weights)[real].sum() + a.pooler_output.sum()).backward()
    ((b.last_hidden_state * weights)[real].sum() + b.pooler_output.sum()).backward()
    check_grads(ours, theirs)


def test_pretraining_masked_only_loss_matches_full_logits(tmp_path):
    ours, theirs = pair("BertForPreTraining", small_config(), tmp_path)
    ids, mask, types = ragged_batch()
    labels = torch.full_like(ids, -100)
    for row, col in [(0, 0), (1, 3), (1, 5), (3, 16), (3, 2)]:
        labels[row, col] = ids[row, col]
    nsp = torch.tensor([0, 1, 1, 0])
    a, b = run_both(ours, theirs, input_ids=ids, attention_mask=mask, token_type_ids=types,
                    labels=labels, next_sentence_label=nsp)
    b.loss.backward()
    close(a.loss, b.loss, what="loss")
    close(a.seq_relationship_logits, b.seq_relationship_logits, what="nsp logits")
    assert a.prediction_logits is None  # never built for the loss
    check_grads(ours, theirs)
    assert a.mlm_count.item() == 5
    assert 0 <= a.mlm_accuracy.item() <= 1 and 0 <= a.nsp_accuracy.item() <= 1
    full = ours(ids, attention_mask=mask, token_type_ids=types)
    close(full.prediction_logits[mask.bool()], b.prediction_logits[mask.bool()], what="prediction_logits")


def test_pretraining_with_no_masked_token_is_finite(tmp_path):
    ours = bertfast.BertForPreTraining(small_config())
    ids, mask, types = ragged_batch()
    out = ours(ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.mlm_count.item() == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_masked_lm(tmp_path):
    ours, theirs = pair("BertForMaskedLM", small_config(), tmp_path)
    ids, mask, types = ragged_batch()
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, -100) * mask + (mask - 1) * 100
    a, b = run_both(ours, theirs, input_ids=ids, attention_mask=mask, labels=labels)
    b.loss.backward()
    close(a.loss, b.loss, what="loss")
    check_grads(ours, theirs)
    with_logits = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    close(with_logits.logits[mask.bool()], b.logits[mask.bool()], what="logits")


def test_next_sentence_prediction(tmp_path):
    ours, theirs = pair("BertForNextSentencePrediction", small_config(), tmp_path)
    ids, mask, types = ragged_batch()
    labels = torch.tensor([1, 0, 1, 0])
    a, b = run_both(ours, theirs, input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b.loss.backward()
    close(a.logits, b.logits, what="logits")
    check_grads(ours, theirs)


@pytest.mark.parametrize(
    "num_labels,labels",
    [(3, torch.tensor([0, 2, 1, 2])), (1, torch.tensor([0.5, -1.0, 2.0, 0.0])),
     (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]))],
    ids=["single_label", "regression", "multi_label"],
)
def test_sequence_classification(tmp_path, num_labels, labels):
    ours, theirs = pair("BertForSequenceClassification", small_config(num_labels=num_labels), tmp_path)
    ids, mask, types = ragged_batch()  # types make these sentence pairs
    a, b = run_both(ours, theirs, input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    b.loss.backward()
    close(a.logits, b.logits, what="logits")
    close(a.loss, b.loss, what="loss")
    assert ours.config.problem_type == theirs.config.problem_type
    check_grads(ours, theirs)


def test_token_classification(tmp_path):
    ours, theirs = pair("BertForTokenClassification", small_config(), tmp_path)
    ids, mask, types = ragged_batch()
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    labels[2, 4] = -100
    a, b = run_both(ours, theirs, input_ids=ids, attention_mask=mask, labels=labels)
    b.loss.backward()
    close(a.logits[mask.bool()], b.logits[mask.bool()], what="logits")
    close(a.loss, b.loss, what="loss")
    check_grads(ours, theirs)


def test_question_answering(tmp_path):
    ours, theirs = pair("BertForQuestionAnswering", small_config(num_labels=2), tmp_path)
    ids, mask, types = ragged_batch()
    start, end = torch.tensor([0, 2, 5, 9]), torch.tensor([0, 6, 12, 40])  # 40: outside, ignored
    a = ours(ids, attention_mask=mask, token_type_ids=types, start_positions=start, end_positions=end)
    b = theirs(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    close(a.start_logits[real], b.start_logits[real], what="start_logits")
    close(a.end_logits[real], b.end_logits[real], what="end_logits")
    # bertfast keeps padded positions out of the span softmax; the same loss from transformers' logits:
    low = torch.finfo(torch.float32).min
    ignored = ids.shape[1]
    ce = torch.nn.CrossEntropyLoss(ignore_index=ignored)
    b_loss = (ce(b.start_logits.masked_fill(~real, low), start.clamp(0, ignored))
              + ce(b.end_logits.masked_fill(~real, low), end.clamp(0, ignored))) / 2
    a.loss.backward()
    b_loss.backward()
    close(a.loss, b_loss, what="loss")
    check_grads(ours, theirs)


def test_multiple_choice(tmp_path):
    ours, theirs = pair("BertForMultipleChoice", small_config(), tmp_path)
    ids, mask, types = ragged_batch(lengths=[3, 17, 9, 1, 12, 6])
    shape = (2, 3, SEQLEN)
    labels = torch.tensor([2, 0])
    a, b = run_both(ours, theirs, input_ids=ids.view(shape), attention_mask=mask.view(shape),
                    token_type_ids=types.view(shape), labels=labels)
    b.loss.backward()
    close(a.logits, b.logits, what="logits")
    check_grads(ours, theirs)


def test_all_padding_row_is_finite_and_leaves_other_rows_alone(tmp_path):
    ours, theirs = pair("BertForSequenceClassification", small_config(), tmp_path)
    ids, mask, types = ragged_batch(lengths=[5, 0, 17])
    a = ours(ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 1, 2]))
    b = theirs(ids, attention_mask=mask, token_type_ids=types)
    assert torch.isfinite(a.logits).all() and torch.isfinite(a.loss)
    close(a.logits[[0, 2]], b.logits[[0, 2]], what="logits of non-empty rows")
    a.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)
    everything_padded = ours(ids, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(everything_padded.logits).all()


def test_inputs_embeds_and_position_ids(tmp_path):
    ours, theirs = pair("BertModel", small_config(), tmp_path)
    ids, mask, types = ragged_batch()
    embeds = torch.randn(*ids.shape, 48)
    positions = torch.randint(0, 40, ids.shape)
    a = ours(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    b = theirs(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    close(a.last_hidden_state[mask.bool()], b.last_hidden_state[mask.bool()], what="last_hidden_state")


def test_output_indexing_like_transformers(tmp_path):
    ours, theirs = pair("BertForSequenceClassification", small_config(), tmp_path)
    ids, mask, _ = ragged_batch()
    a = ours(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 0]))
    b = theirs(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 0]))
    close(a[0], b[0], what="out[0] (loss)")
    close(a[1], b[1], what="out[1] (logits)")
    close(a["logits"], b["logits"], what="out['logits']")
    assert list(a.keys()) == list(b.keys())
    as_tuple = ours(ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (4, 3)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = small_config()
    torch.manual_seed(0)
    plain = bertfast.BertForMaskedLM(config).train()
    ckpt = bertfast.BertForMaskedLM(config).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable()
    ids, mask, _ = ragged_batch()
    labels = ids.masked_fill(mask == 0, -100)
    plain(ids, attention_mask=mask, labels=labels).loss.backward()
    ckpt(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        close(q.grad, p.grad, tol=1e-6, what=name)


def test_dropout_statistics_match_transformers(tmp_path):
    """With dropout on, each run differs, but the distribution over runs matches transformers'."""
    config = small_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ours, theirs = pair("BertModel", config, tmp_path)
    ours.train()
    theirs.train()
    ids, mask, types = ragged_batch(lengths=[17, 17])
    real = mask.bool()
    runs = 200
    with torch.no_grad():
        a = torch.stack([ours(ids, attention_mask=mask).last_hidden_state[real] for _ in range(runs)])
        b = torch.stack([theirs(ids, attention_mask=mask).last_hidden_state[real] for _ in range(runs)])
    assert not torch.equal(a[0], a[1])
    # Per-element mean and spread over runs agree to within sampling noise.
    mean_gap = (a.mean(0) - b.mean(0)).abs().mean() / b.std(0).mean()
    spread_ratio = a.std(0).mean() / b.std(0).mean()
    assert mean_gap < 0.1, mean_gap
    assert 0.95 < spread_ratio < 1.05, spread_ratio


def test_last_layer_runs_only_on_labelled_rows_and_cls():
    torch.manual_seed(0)
    model = bertfast.BertForPreTraining(small_config()).eval()
    ids, mask, types = ragged_batch()
    labels = torch.full_like(ids, -100)
    labels[1, 4] = 3
    labels[3, 10] = 8
    encoded = model.bert.encode(ids, mask, types, needed=labels != -100)
    assert encoded.hidden.shape[0] == 2 + 4  # two labelled tokens + each row's [CLS]
    subset = model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    full = model(ids, attention_mask=mask, token_type_ids=types, labels=labels, return_logits=True)
    close(subset.loss, full.loss, tol=1e-6, what="loss")
    close(subset.seq_relationship_logits, full.seq_relationship_logits, tol=1e-6, what="nsp logits")

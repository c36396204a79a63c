"""bertfast.accelerate / patch_transformers on transformers' own BERT-family models: parity, fallbacks, wrappers."""

from __future__ import annotations

import copy

import pytest
import torch

import bertfast
from bertfast import prepacked
from bertfast.dropin import fallback_reason, is_accelerated

transformers = pytest.importorskip("transformers")

VOCAB = 60
LENGTHS = [9, 1, 5, 7]  # ragged, with a row of length 1


def bert_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=72, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=3)
    values.update(overrides)
    return transformers.BertConfig(**values)


def roberta_config(cls=None, **overrides):
    values = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=72, max_position_embeddings=40, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=1, type_vocab_size=1)
    values.update(overrides)
    return (cls or transformers.RobertaConfig)(**values)


def ragged_batch(pad_id: int, rows: int | None = None, seqlen: int = 9):
    lengths = LENGTHS if rows is None else [seqlen - (i % seqlen) for i in range(rows)]
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen))
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = pad_id
    return ids, mask


def masked_objective(out, mask: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of every output that depends only on real positions."""
    total = 0.0
    gen = torch.Generator().manual_seed(1)
    for key in out.keys():
        value = out[key]
        if key == "loss":
            total = total + value
            continue
        for t in value if isinstance(value, tuple) else (value,):
            w = torch.randn(t.shape, generator=gen)
            if t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
                w = w * mask.view(*mask.shape, *([1] * (t.dim() - 2)))
            total = total + (t * w).sum()
    return total


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float = 1e-5) -> None:
    """|actual - expected| <= tol x max(1, |expected|max): gradients summed over a batch reach 1e2."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.0e} x {scale:.3g}"


def assert_parity(ref: torch.nn.Module, fast: torch.nn.Module, inputs: dict, mask: torch.Tensor) -> None:
    out_ref = ref(**inputs, output_hidden_states=True)
    out_fast = fast(**inputs, output_hidden_states=True)
    assert type(out_fast) is type(out_ref)
    assert list(out_fast.keys()) == list(out_ref.keys())
    for key in out_ref.keys():
        a, b = out_ref[key], out_fast[key]
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
            if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
                keep = mask.bool()
                x, y = x[keep], y[keep]
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    masked_objective(out_ref, mask).backward()
    masked_objective(out_fast, mask).backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters()}
    checked = 0
    for name, p in fast.named_parameters():
        if grads_ref[name] is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert_scaled_close(p.grad, grads_ref[name], name)
        checked += 1
    assert checked > 10


BERT_HEADS = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
              "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"]
ROBERTA_HEADS = [("RobertaConfig", "RobertaModel"), ("RobertaConfig", "RobertaForMaskedLM"),
                 ("RobertaConfig", "RobertaForSequenceClassification"),
                 ("RobertaConfig", "RobertaForTokenClassification"),
                 ("RobertaConfig", "RobertaForQuestionAnswering"),
                 ("XLMRobertaConfig", "XLMRobertaForSequenceClassification"),
                 ("XLMRobertaConfig", "XLMRobertaForMaskedLM"),
                 ("CamembertConfig", "CamembertModel"), ("CamembertConfig", "CamembertForTokenClassification")]


def _labels_for(name: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    batch = ids.shape[0]
    if name.endswith(("ForMaskedLM", "ForPreTraining")):
        labels = torch.where(torch.rand(ids.shape) < 0.4, ids, -100)
        labels[mask == 0] = -100
        extra = {"labels": labels}
        if name.endswith("ForPreTraining"):
            extra["next_sentence_label"] = torch.randint(0, 2, (batch,))
        return extra
    if name.endswith("NextSentencePrediction"):
        return {"labels": torch.randint(0, 2, (batch,))}
    if name.endswith("SequenceClassification"):
        return {"labels": torch.randint(0, 3, (batch,))}
    if name.endswith("TokenClassification"):
        return {"labels": torch.where(mask.bool(), torch.randint(0, 3, ids.shape), -100)}
    return {}


@pytest.mark.parametrize("name", BERT_HEADS)
def test_bert_heads_match_transformers_outputs_and_every_gradient(name, one_thread):
    labels = 2 if name.endswith("QuestionAnswering") else 3
    ref = getattr(transformers, name)(bert_config(num_labels=labels)).train()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=0)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=(torch.arange(9) > 4).long().expand(4, 9),
                  **_labels_for(name, ids, mask))
    assert_parity(ref, fast, inputs, mask)


@pytest.mark.parametrize("config_name,name", ROBERTA_HEADS)
def test_roberta_family_heads_match_transformers(config_name, name, one_thread):
    labels = 2 if name.endswith("QuestionAnswering") else 3
    ref = getattr(transformers, name)(roberta_config(getattr(transformers, config_name), num_labels=labels)).train()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=1)
    assert_parity(ref, fast, dict(input_ids=ids, attention_mask=mask, **_labels_for(name, ids, mask)), mask)


@pytest.mark.parametrize("name,config", [("BertForMultipleChoice", bert_config),
                                         ("RobertaForMultipleChoice", roberta_config)])
def test_multiple_choice_matches_transformers(name, config, one_thread):
    ref = getattr(transformers, name)(config()).train()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=ref.config.pad_token_id, rows=6)
    inputs = dict(input_ids=ids.view(2, 3, 9), attention_mask=mask.view(2, 3, 9), labels=torch.tensor([0, 2]))
    out_ref, out_fast = ref(**inputs), fast(**inputs)
    torch.testing.assert_close(out_fast.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (name_, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert_scaled_close(p.grad, q.grad, name_)


def test_inputs_embeds_position_ids_and_tuples(one_thread):
    ref = transformers.BertModel(bert_config()).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=0)
    embeds = torch.randn(4, 9, 48)
    positions = torch.arange(9).flip(0)[None]
    for kwargs in (dict(inputs_embeds=embeds), dict(input_ids=ids, position_ids=positions)):
        a = ref(attention_mask=mask, return_dict=False, **kwargs)
        b = fast(attention_mask=mask, return_dict=False, **kwargs)
        assert isinstance(b, tuple) and len(b) == len(a)
        keep = mask.bool()
        torch.testing.assert_close(b[0][keep], a[0][keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=1e-5)


def test_roberta_positions_from_inputs_embeds(one_thread):
    ref = transformers.RobertaModel(roberta_config()).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    embeds = torch.randn(2, 7, 48)
    torch.testing.assert_close(fast(inputs_embeds=embeds).last_hidden_state,
                               ref(inputs_embeds=embeds).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_same_parameters_state_dict_and_class():
    model = transformers.BertForSequenceClassification(bert_config())
    params = list(model.parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert bertfast.accelerate(model) is model
    assert type(model) is transformers.BertForSequenceClassification
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys
    assert is_accelerated(model.bert)
    before = model.classifier.weight.detach().clone()
    ids, mask = ragged_batch(pad_id=0)
    model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    optimizer.step()  # the optimizer built before the call updates the model that runs
    assert not torch.equal(model.classifier.weight, before)
    assert bertfast.accelerate(model) is model  # twice is harmless


def test_fallbacks_give_transformers_answers(one_thread):
    config = bert_config()
    config._attn_implementation = "eager"
    ref = transformers.BertModel(config).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=0)
    a = ref(ids, attention_mask=mask, output_attentions=True)
    b = fast(ids, attention_mask=mask, output_attentions=True)
    assert b.attentions is not None and len(b.attentions) == 2
    for x, y in zip(a.attentions, b.attentions, strict=True):
        torch.testing.assert_close(y, x)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state)  # padded positions too: transformers ran
    mask4d = torch.zeros(4, 1, 9, 9)
    mask4d[:, :, :, 5:] = torch.finfo(torch.float32).min
    torch.testing.assert_close(fast(ids, attention_mask=mask4d).last_hidden_state,
                               ref(ids, attention_mask=mask4d).last_hidden_state)
    assert "output_attentions" in fallback_reason(fast, {"output_attentions": True})
    assert "4-D" in fallback_reason(fast, {"attention_mask": mask4d})
    assert fallback_reason(fast, {"attention_mask": mask}) is None
    # what Trainer passes on every step does not send it back to transformers' forward
    assert fallback_reason(fast, {"attention_mask": mask, "kwargs": {"num_items_in_batch": torch.tensor(7)}}) is None
    assert "cu_seq_lens_q" in fallback_reason(fast, {"kwargs": {"cu_seq_lens_q": torch.tensor([0, 4])}})
    assert "unknown_option" in fallback_reason(fast, {"kwargs": {"unknown_option": 1}})


def test_unsupported_models_are_named():
    with pytest.raises(TypeError, match="Linear is not, and does not contain, a supported model"):
        bertfast.accelerate(torch.nn.Linear(2, 2))
    convbert = transformers.ConvBertModel(transformers.ConvBertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match="ConvBertModel"):
        bertfast.accelerate(convbert)
    with pytest.raises(ValueError, match="BertModel with is_decoder"):
        bertfast.accelerate(transformers.BertModel(bert_config(is_decoder=True)))


def test_bertfast_models_pass_through():
    model = bertfast.BertModel(bertfast.BertConfig.from_preset("tiny", vocab_size=50))
    assert bertfast.accelerate(model) is model


def test_save_pretrained_after_accelerating_loads_in_plain_transformers(tmp_path, one_thread):
    model = bertfast.accelerate(transformers.BertForMaskedLM(bert_config()).eval())
    model.save_pretrained(tmp_path)
    plain = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert not is_accelerated(plain.bert)
    ids, mask = ragged_batch(pad_id=0)
    keep = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[keep],
                               plain(ids, attention_mask=mask).logits[keep], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(one_thread):
    ref = transformers.BertForSequenceClassification(bert_config()).train()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    fast.gradient_checkpointing_enable()
    ids, mask = ragged_batch(pad_id=0)
    labels = torch.tensor([0, 1, 2, 0])
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    fast(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert_scaled_close(p.grad, q.grad, name)


def test_training_with_dropout_converges(one_thread):
    torch.manual_seed(0)
    model = bertfast.accelerate(transformers.BertForSequenceClassification(
        bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2)))
    ids, mask = ragged_batch(pad_id=0, rows=16)
    labels = (ids[:, 0] % 2).long()  # learnable from the first token
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_dynamic_quantized_linear_layers_take_effect(one_thread):
    ref = transformers.BertModel(bert_config()).eval()
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ref), {torch.nn.Linear}, dtype=torch.qint8)
    fast = bertfast.accelerate(copy.deepcopy(quantized))
    ids, mask = ragged_batch(pad_id=0)
    keep = mask.bool()
    expected = quantized(ids, attention_mask=mask).last_hidden_state[keep]
    got = fast(ids, attention_mask=mask).last_hidden_state[keep]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # and the quantization is not ignored: the result differs from the float model
    assert (got - ref(ids, attention_mask=mask).last_hidden_state[keep]).abs().max() > 1e-4


class UserHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = transformers.BertModel(bert_config())
        self.score = torch.nn.Linear(48, 1)

    def forward(self, ids, mask):
        return self.score(self.encoder(ids, attention_mask=mask).pooler_output)


def test_a_users_module_around_a_bert_model(one_thread):
    ref = UserHead().eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    assert is_accelerated(fast.encoder)
    ids, mask = ragged_batch(pad_id=0)
    torch.testing.assert_close(fast(ids, mask), ref(ids, mask), atol=1e-5, rtol=1e-5)


def test_patch_transformers_builds_accelerated_models_and_undoes(one_thread):
    one_by_one = bertfast.accelerate(transformers.BertModel(bert_config()).eval())
    try:
        bertfast.patch_transformers()
        bertfast.patch_transformers()  # twice is harmless
        model = transformers.AutoModelForSequenceClassification.from_config(bert_config()).eval()
        assert is_accelerated(model.bert)
        roberta = transformers.AutoModel.from_config(roberta_config()).eval()
        assert is_accelerated(roberta)
        ids, mask = ragged_batch(pad_id=0)
        fast_logits = model(ids, attention_mask=mask).logits
    finally:
        bertfast.unpatch_transformers()
    assert not is_accelerated(model.bert)
    assert is_accelerated(one_by_one)  # unpatching leaves models accelerated one by one as they are
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, fast_logits, atol=1e-5, rtol=1e-5)


def test_inference_qkv_cache_follows_weight_updates(one_thread):
    """The fused q/k/v weights cached for inference never go stale: not after an in-place edit, and
    not after a fused optimizer step (which leaves version counters alone)."""
    model = bertfast.BertModel(bertfast.BertConfig.from_preset("tiny", vocab_size=VOCAB)).eval()
    ids, mask = ragged_batch(pad_id=0)

    def fresh():
        clone = copy.deepcopy(model)
        for module in clone.modules():
            prepacked.drop_cache(module)
        return clone(ids, attention_mask=mask).last_hidden_state

    with torch.no_grad():
        model(ids, attention_mask=mask)
        model.encoder.layer[0].attention.self.query.weight.mul_(1.5)
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, fresh())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()
    model(ids, attention_mask=mask).last_hidden_state.sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, fresh())

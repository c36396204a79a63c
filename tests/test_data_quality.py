"""Corpus quality: sentences in lowercase and Chinese/Japanese text, over-long lines, missing document
boundaries, and the report shown before training."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import normalizers, pre_tokenizers

from bertfast.data import CorpusStats, PretrainingData, build_token_cache, load_tokenizer, make_collator
from bertfast.data.corpus import PSEUDO_DOCUMENT_LINES, read_documents, split_sentences
from bertfast.data.instances import A_END, A_START, IS_RANDOM_NEXT, create_instances, segmented_bounds
from bertfast.data.tokenizer import SPECIAL_TOKENS

# Chinese notes on BERT (Markdown), the project's seed text, copied from shared/seed/ (see tests/data/README.md).
CHINESE = Path(__file__).parent / "data" / "zh_bert_notes.txt"


def written_tokenizer(directory: Path, texts: list[str]):
    """A vocabulary of every pre-token of ``texts`` (as BERT's normalizer and pre-tokenizer cut them)."""
    normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    words = {w for text in texts for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(
        normalizer.normalize_str(text))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join([*SPECIAL_TOKENS, *sorted(words)]) + "\n", encoding="utf-8")
    return load_tokenizer(directory / "vocab.txt")


def pipeline(tmp_path: Path, paths: list[str], seq_len: int = 64, **options) -> PretrainingData:
    texts = [s for doc in read_documents(paths) for s in doc]
    tokenizer = written_tokenizer(tmp_path / "vocab", texts)
    corpus = build_token_cache(paths, tokenizer, tmp_path / "cache", progress=False)
    return PretrainingData(corpus, tokenizer, make_collator(tokenizer), batch_size=2, max_seq_len=seq_len,
                           **options)


def test_sentences_end_whatever_case_follows_but_not_at_abbreviations():
    assert split_sentences("the cat sat. the dog ran! did it? yes… e.g. this. mr. smith came. U.S. law.") == [
        "the cat sat.", "the dog ran!", "did it?", "yes…", "e.g. this.", "mr. smith came.", "U.S. law."]


def test_chinese_and_japanese_sentence_ends_need_no_space():
    assert split_sentences("我的狗很可爱。企鹅不擅长飞行！真的吗？是的；他说「好。」然后走了") == [
        "我的狗很可爱。", "企鹅不擅长飞行！", "真的吗？", "是的；", "他说「好。」", "然后走了"]
    assert split_sentences("今日は晴れです。明日は雨でしょうか？わかりません！") == [
        "今日は晴れです。", "明日は雨でしょうか？", "わかりません！"]


def test_the_chinese_seed_corpus_gives_real_sentences_and_nsp_pairs(tmp_path):
    stats = CorpusStats()
    docs = list(read_documents([str(CHINESE)], stats))
    assert stats.documents == 65 and stats.sentences >= 110  # one sentence per line gave 73
    assert sum(len(d) >= 2 for d in docs) >= 20
    assert ["机器要做的是判断，是否有可能**从前提中推断出假设**。", "这个前提与这个假设相矛盾吗？",
            "或者说它们不是相矛盾的句子？"] in docs

    data = pipeline(tmp_path, [str(CHINESE)], seq_len=128, eval_fraction=0.05)
    instances = create_instances(data.corpus, np.arange(len(data.corpus)), 128, 0.0, np.random.default_rng(0))
    # A real pair: B is the next sentence(s), so A ends at a sentence boundary, not inside a sentence.
    real = 0
    for row in instances[instances[:, IS_RANDOM_NEXT] == 0]:
        for d in range(len(data.corpus)):
            _, bounds = data.corpus.sentence_bounds(d)
            if bounds[0] <= row[A_START] < bounds[-1]:
                real += int(row[A_END] in bounds[1:-1])
                break
    assert real >= 10
    assert data.report().truncated_share < 0.05


def test_lowercase_jsonl_gives_as_many_instances_as_capitalised_text(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    docs = [" ".join(" ".join(rng.choice(words, 10)) + "." for _ in range(20)) for _ in range(12)]
    lower = tmp_path / "lower.jsonl"
    lower.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    upper = tmp_path / "upper.jsonl"
    upper.write_text("".join(json.dumps({"text": ". ".join(s.capitalize() for s in d.split(". "))}) + "\n"
                             for d in docs))
    counts = [len(pipeline(tmp_path / name, [str(path)]).epoch_instances(0)) for name, path in
              (("lower", lower), ("upper", upper))]
    assert counts[0] == counts[1] > 12 * 20 * 11 // 61 * 0.9  # ~11 tokens a sentence, 61 an instance


def test_an_over_long_line_is_cut_into_segments_not_truncated(tmp_path):
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(40)]
    path = tmp_path / "long.txt"
    others = "\n\n".join(" ".join(rng.choice(words, 8)) + " ." for _ in range(10))
    path.write_text(" ".join(rng.choice(words, 20000)) + "\n\n" + others + "\n")
    data = pipeline(tmp_path, [str(path)], eval_fraction=0.0)
    report = data.report()
    assert report.instances > 20000 / 61 * 0.9  # one instance per epoch before
    assert report.truncated_share < 0.1
    assert any("1 sentences are longer than a whole instance" in w for w in report.warnings())


def test_segments_tile_an_over_long_sentence_and_leave_short_ones_alone():
    bounds = np.array([0, 3, 103, 110])
    np.testing.assert_array_equal(segmented_bounds(bounds, 31), [0, 3, 28, 53, 78, 103, 110])
    assert segmented_bounds(bounds, 100) is bounds


def test_text_without_document_boundaries_becomes_pseudo_documents(tmp_path):
    rng = np.random.default_rng(2)
    words = [f"w{i}" for i in range(40)]
    path = tmp_path / "one_block.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) + " ." for _ in range(5 * PSEUDO_DOCUMENT_LINES)))
    stats = CorpusStats()
    with pytest.warns(UserWarning, match="no blank line between documents in 250 lines: cut into pseudo-doc"):
        docs = list(read_documents([str(path)], stats))
    assert [len(d) for d in docs] == [PSEUDO_DOCUMENT_LINES] * 5
    assert "1 files without document boundaries" in stats.summary()
    with pytest.warns(UserWarning):
        data = pipeline(tmp_path, [str(path)], eval_fraction=0.2)
    assert len(data.eval_docs) == 1 and not data.report().warnings()


def test_the_report_warns_about_a_single_document_and_one_sentence_documents(tmp_path):
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"text": " ".join(f"w{i % 7} w{i % 5}." for i in range(200))}) + "\n")
    (warning,) = pipeline(tmp_path / "a", [str(single)], eval_fraction=0.05).report().warnings()
    assert warning.startswith("1 document(s): no held-out documents, so no evaluation")
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"w{i} w{i + 1} w{i + 2} ." for i in range(40)))
    warnings = pipeline(tmp_path / "b", [str(short)]).report().warnings()
    assert any("40 of 40 documents have one sentence" in w for w in warnings)

"""Corpus reading: formats, globs, the built-in corpus, and broken input counted instead of fatal."""

import json

import pytest

from bertfast.data.corpus import (
    BUILTIN,
    CorpusStats,
    EmptyCorpusError,
    builtin_documents,
    read_documents,
    resolve_paths,
    split_sentences,
)


def test_text_files_split_documents_at_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First sentence.\nSecond one.\n\n\nOther doc.\n  \nThird doc line.\n", encoding="utf-8")
    stats = CorpusStats()
    docs = list(read_documents([str(path)], stats))
    assert docs == [["First sentence.", "Second one."], ["Other doc."], ["Third doc line."]]
    assert (stats.files, stats.documents, stats.sentences) == (1, 3, 4)
    assert not stats.problems


def test_jsonl_documents_are_split_into_sentences(tmp_path):
    path = tmp_path / "a.jsonl"
    records = [{"text": "One sentence here. Another follows! Is this a third? Yes."},
               {"text": "Wrapped\nline stays one sentence.\n\nNew paragraph.", "id": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    docs = list(read_documents([str(path)]))
    assert docs == [["One sentence here.", "Another follows!", "Is this a third?", "Yes."],
                    ["Wrapped line stays one sentence.", "New paragraph."]]


def test_split_sentences_keeps_abbreviation_like_lowercase_continuations():
    assert split_sentences("Use e.g. this one. Then \"Quoted.\" Next") == [
        "Use e.g. this one.", "Then \"Quoted.\"", "Next"]


def test_broken_input_is_counted_and_skipped(tmp_path):
    good = tmp_path / "good.txt"
    good.write_bytes(b"Fine line.\n\xff\xfe broken bytes\nAnother fine line.\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n", encoding="utf-8")
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(
        b'{"text": "Valid doc. Two sentences."}\n'
        b'{"text": broken json\n'
        b'{"title": "no text field"}\n'
        b'["not", "an", "object"]\n'
        b'{"text": 42}\n'
        b'\xc3\x28 invalid utf-8\n'
        b'\n'
        b'{"text": "Last doc."}\n'
    )
    stats = CorpusStats()
    with pytest.warns(UserWarning) as caught:
        docs = list(read_documents([str(good), str(empty), str(blank), str(jsonl)], stats))
    assert any("skipping invalid json lines" in str(w.message) for w in caught)
    assert docs == [["Fine line.", "Another fine line."], ["Valid doc.", "Two sentences."], ["Last doc."]]
    assert stats.problems == {"bad_encoding_lines": 2, "empty_files": 2, "invalid_json_lines": 1,
                              "missing_text_field": 3}
    summary = stats.summary()
    assert "3 documents" in summary and "2 empty files" in summary and "1 invalid json lines" in summary


def test_resolve_paths_expands_globs_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.txt", "x.jsonl"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    assert resolve_paths([str(tmp_path / "*.txt"), BUILTIN, str(tmp_path / "a.txt")]) == [
        str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), BUILTIN]
    assert resolve_paths([str(tmp_path / "sub")]) == [str(tmp_path / "sub" / "c.txt")]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_paths([str(tmp_path / "*.md")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_paths([str(tmp_path / "missing.txt")])


def test_builtin_corpus_is_prose_split_into_documents():
    docs = builtin_documents()
    assert len(docs) > 100
    assert sum(map(len, docs)) > 3000
    sentences = [s for d in docs for s in d]
    assert not any(set(s) <= set("+-=| ") for s in sentences)  # no table borders or heading rules
    assert len({tuple(d) for d in docs}) == len(docs)


def test_empty_corpus_is_a_clear_error(tmp_path):
    from bertfast.data import build_token_cache, train_tokenizer

    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    tokenizer = train_tokenizer(["some words to learn from"], 50)
    with pytest.warns(UserWarning), pytest.raises(EmptyCorpusError, match="yields no text"):
        build_token_cache([str(empty)], tokenizer, tmp_path / "cache", progress=False)

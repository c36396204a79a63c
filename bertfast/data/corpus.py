"""Reading a pretraining corpus: documents made of sentences, from text files, JSONL or the built-in corpus.

* Plain text (any extension but ``.jsonl``/``.json``): one sentence per line, a blank line between
  documents (the format of BERT's ``create_pretraining_data.py``).
* JSONL (``.jsonl``/``.json``): one document per line, a JSON object with a ``text`` field; the
  text is split into sentences with a simple regex splitter.
* ``builtin``: CPython's reference manual topics from ``pydoc_data`` (present wherever Python is),
  one document per section.

Broken input (undecodable lines, invalid JSON, a missing ``text`` field, empty or unreadable files)
is counted in :class:`CorpusStats` and skipped with a warning; it never stops the run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BUILTIN = "builtin"
JSON_SUFFIXES = (".jsonl", ".json")

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace
# and a capital letter, digit or opening quote/bracket.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]’”]))\s+(?=[\"'(\[“‘A-Z0-9])")
_HEADING_RULE = re.compile(r"^([*=\-~^])\1{2,}$")
_TABLE_RULE = re.compile(r"^\s*[-=+*~^|]{3,}[-=+*~^|\s]*$")
# Indented blocks with these marks are code or grammar, not wrapped prose.
_CODE_MARK = re.compile(r"^\s*(>>>|\.\.\.)|::=|[{};]\s*$|^\s*(def|class|for|if|return|import)\b")
_WARN_LIMIT = 5

Document = list[str]


class EmptyCorpusError(ValueError):
    """The corpus yielded no document with any text."""


@dataclass
class CorpusStats:
    """What reading a corpus kept and what it skipped (problem -> count)."""

    files: int = 0
    documents: int = 0
    sentences: int = 0
    problems: Counter = field(default_factory=Counter)
    _warned: int = 0

    def problem(self, kind: str, where: str) -> None:
        self.problems[kind] += 1
        if self._warned < _WARN_LIMIT:
            warnings.warn(f"corpus: skipping {kind.replace('_', ' ')} at {where}", stacklevel=3)
        elif self._warned == _WARN_LIMIT:
            warnings.warn("corpus: more problems skipped; see the summary", stacklevel=3)
        self._warned += 1

    def summary(self) -> str:
        text = f"{self.files} file(s), {self.documents} documents, {self.sentences} sentences"
        if self.problems:
            text += "; skipped: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in
                                              sorted(self.problems.items()))
        return text


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences; blank lines end paragraphs, single newlines are wrapping."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            sentences.extend(s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip())
    return sentences


def resolve_paths(patterns: Iterable[str]) -> list[str]:
    """Expand files, directories and glob patterns (sorted, deduplicated); ``builtin`` stays as is."""
    paths: list[str] = []
    for pattern in patterns:
        if pattern == BUILTIN:
            matches = [BUILTIN]
        elif os.path.isdir(pattern):
            matches = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file())
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        else:
            matches = [pattern]
        if not matches:
            raise FileNotFoundError(f"corpus pattern {pattern!r} matches no file")
        for path in matches:
            if path != BUILTIN and not os.path.isfile(path):
                raise FileNotFoundError(f"corpus file {path!r} does not exist")
            if path not in paths:
                paths.append(path)
    return paths


def _decoded_lines(path: str, stats: CorpusStats) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.problem("bad_encoding_lines", f"{path}:{number}")


def _text_documents(path: str, stats: CorpusStats) -> Iterator[Document]:
    document: Document = []
    for line in _decoded_lines(path, stats):
        line = line.strip()
        if line:
            document.append(line)
        elif document:
            yield document
            document = []
    if document:
        yield document


def _jsonl_documents(path: str, stats: CorpusStats) -> Iterator[Document]:
    for number, line in enumerate(_decoded_lines(path, stats), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            stats.problem("invalid_json_lines", f"{path}:{number}")
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.problem("missing_text_field", f"{path}:{number}")
            continue
        sentences = split_sentences(text)
        if sentences:
            yield sentences


def _section_sentences(lines: list[str]) -> Document:
    """Prose paragraphs (indented ones too) become sentences; code and grammar keep one line per sentence."""
    sentences: Document = []
    for block in "\n".join(lines).split("\n\n"):
        block_lines = [line for line in block.split("\n") if line.strip()]
        if not block_lines:
            continue
        indents = {len(line) - len(line.lstrip()) for line in block_lines}
        if indents != {0} and (len(indents) > 1 or any(_CODE_MARK.search(line) for line in block_lines)):
            sentences.extend(line.strip() for line in block_lines)
        else:
            sentences.extend(split_sentences(block))
    return sentences


def builtin_documents() -> list[Document]:
    """CPython's reference manual (``pydoc_data.topics``), one document per section, duplicates removed."""
    from pydoc_data.topics import topics

    documents: list[Document] = []
    seen: set[tuple[str, ...]] = set()
    for name in sorted(topics):
        lines = topics[name].splitlines()
        # A heading is a line underlined by a rule of *, =, - ...; each one starts a section.
        starts = [0] + [i - 1 for i in range(1, len(lines)) if _HEADING_RULE.match(lines[i].strip())
                        and lines[i - 1].strip()]
        for begin, end in zip(starts, starts[1:] + [len(lines)], strict=True):
            # Table borders are dropped and cell separators blanked: only the cell text is language.
            section = [line.replace("|", " ") for line in lines[begin:end]
                       if not (_HEADING_RULE.match(line.strip()) or _TABLE_RULE.match(line))]
            document = _section_sentences(section)
            key = tuple(document)
            if len(document) >= 2 and key not in seen:
                seen.add(key)
                documents.append(document)
    return documents


def read_documents(paths: Iterable[str], stats: CorpusStats | None = None) -> Iterator[Document]:
    """Yield the documents of every path in order (``builtin`` for the built-in corpus)."""
    stats = stats if stats is not None else CorpusStats()
    for path in paths:
        stats.files += 1
        if path == BUILTIN:
            source: Iterable[Document] = builtin_documents()
        elif path.lower().endswith(JSON_SUFFIXES):
            source = _jsonl_documents(path, stats)
        else:
            source = _text_documents(path, stats)
        found = 0
        try:
            for document in source:
                found += 1
                stats.documents += 1
                stats.sentences += len(document)
                yield document
        except OSError as e:
            stats.problem("unreadable_files", f"{path} ({e})")
            continue
        if not found:
            stats.problem("empty_files", path)

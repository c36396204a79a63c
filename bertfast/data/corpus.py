"""Reading a pretraining corpus: documents made of sentences, from text files, JSONL or the built-in corpus.

* Plain text (any extension but ``.jsonl``/``.json``): one sentence per line, a blank line between
  documents (the format of BERT's ``create_pretraining_data.py``); a line holding several sentences
  is split into them. A file of more than ``PSEUDO_DOCUMENT_LINES`` lines without any blank line has
  no document boundaries: it is cut into pseudo-documents of that many lines, with a warning.
* JSONL (``.jsonl``/``.json``): one document per line, a JSON object with a ``text`` field; the
  text is split into sentences.

Sentences end at ``.``, ``!``, ``?`` or ``…`` before whitespace, whatever case follows (so lowercase
text splits too; ``e.g.``, single letters and a few common abbreviations do not end one), and at
the Chinese and Japanese ends ``。！？；``, which need no space after them. Text without any
sentence end stays one sentence; the instance builder cuts over-long sentences into segments.
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

_CLOSERS = "\"')\\]’”」』）】》"
# A Latin-script end: . ! ? or … (and closing quotes or brackets) before whitespace; the word before
# a full stop decides whether it is an abbreviation instead.
_LATIN_END = re.compile(rf"(\S*?)([.!?…]+)[{_CLOSERS}]*(?=\s)")
# Chinese/Japanese ends need no space after them.
_CJK_END = re.compile(rf"[。！？；]+[{_CLOSERS}]*")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs cf fig figs no vol al approx ca eq ref sec ch".split())
PSEUDO_DOCUMENT_LINES = 50
_HEADING_RULE = re.compile(r"^([*=\-~^])\1{2,}$")
_TABLE_RULE = re.compile(r"^\s*[-=+*~^|]{3,}[-=+*~^|\s]*$")
# Indented blocks with these marks are code or grammar, not wrapped prose.
_CODE_MARK = re.compile(r"^\s*(>>>|\.\.\.)|::=|[{};]\s*$|^\s*(def|class|for|if|return|import)\b")
_WARN_LIMIT = 5

Document = list[str]


class CorpusError(ValueError):
    """The corpus cannot feed the run as asked (no text, or too little for one batch)."""


class EmptyCorpusError(CorpusError):
    """The corpus yielded no document with any text."""


@dataclass
class CorpusStats:
    """What reading a corpus kept and what it skipped (problem -> count)."""

    files: int = 0
    documents: int = 0
    sentences: int = 0
    problems: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    _warned: int = 0

    def problem(self, kind: str, where: str) -> None:
        self.problems[kind] += 1
        if self._warned < _WARN_LIMIT:
            warnings.warn(f"corpus: skipping {kind.replace('_', ' ')} at {where}", stacklevel=3)
        elif self._warned == _WARN_LIMIT:
            warnings.warn("corpus: more problems skipped; see the summary", stacklevel=3)
        self._warned += 1

    def note(self, kind: str, where: str, message: str) -> None:
        """Something kept, but changed or doubtful: warned about (a few times) and counted in the summary."""
        self.notes[kind] += 1
        if self.notes[kind] <= _WARN_LIMIT:
            warnings.warn(f"corpus: {where}: {message}", stacklevel=3)

    def summary(self) -> str:
        text = f"{self.files} file(s), {self.documents} documents, {self.sentences} sentences"
        if self.notes:
            text += "; " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(self.notes.items()))
        if self.problems:
            text += "; skipped: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in
                                              sorted(self.problems.items()))
        return text


def _is_abbreviation(word: str, stops: str) -> bool:
    if stops != ".":
        return False
    word = word.lstrip(_CLOSERS + "(\"'“‘")
    # "e.g", "U.S", "i.e": letters joined by dots; a single letter (an initial); a listed short form.
    return len(word) == 1 and word.isalpha() or "." in word and word.replace(".", "").isalpha() \
        or word.lower() in _ABBREVIATIONS


def _sentence_ends(paragraph: str) -> list[int]:
    """Offsets just past each sentence end of a whitespace-normalised paragraph."""
    ends = {m.end() for m in _CJK_END.finditer(paragraph)}
    for m in _LATIN_END.finditer(paragraph):
        list_marker = m.start() == 0 and m.group(1).isdigit()  # "1. First point"
        if not (list_marker or _is_abbreviation(m.group(1), m.group(2))):
            ends.add(m.end())
    return sorted(e for e in ends if e < len(paragraph))


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences; blank lines end paragraphs, single newlines are wrapping."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split())
        start = 0
        for end in [*_sentence_ends(paragraph), len(paragraph)]:
            sentence = paragraph[start:end].strip()
            if sentence:
                sentences.append(sentence)
            start = end
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
    lines = 0
    boundaries = False
    for line in _decoded_lines(path, stats):
        line = line.strip()
        if line:
            document.extend(split_sentences(line))
            lines += 1
        elif document:
            boundaries = True
            yield document
            document = []
    if document and not boundaries and lines > PSEUDO_DOCUMENT_LINES:
        stats.note("files_without_document_boundaries", path,
                   f"no blank line between documents in {lines} lines: cut into pseudo-documents of "
                   f"{PSEUDO_DOCUMENT_LINES} lines")
        # Sentences stand in for lines here (a line may have held several): pseudo-documents of the same size.
        per_line = len(document) / lines
        size = max(1, round(PSEUDO_DOCUMENT_LINES * per_line))
        yield from (document[i:i + size] for i in range(0, len(document), size))
    elif document:
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

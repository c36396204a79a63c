"""The files fine-tuning data come in: JSON lines, JSON, CSV/TSV with a header, CoNLL, SQuAD JSON.

Each reader yields ``(where, row)`` pairs, ``where`` naming the file and line (or, in a SQuAD file,
which is often one long line, the question's id and JSON path), so that a bad row is reported where
it is. Which columns of a table hold the text and the label is inferred from their names, as
transformers' ``run_glue.py`` does, or set explicitly (:func:`infer_columns`).

TSV fields are taken literally, without quoting, as GLUE's files are written (their sentences hold
unbalanced quote characters); CSV follows the usual quoting rules.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "conll", "squad")

# Text columns by name, pairs first (QNLI has both "question" and "sentence"); matched case-insensitively.
TEXT_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("#1 string", "#2 string"),  # MRPC
    ("text", "text_pair"),
    ("sentence", None),
    ("text", None),
)
LABEL_COLUMNS = ("label", "labels", "score", "gold_label", "is_duplicate", "quality")


class DataError(ValueError):
    """A data file is missing, empty, or holds a row that breaks its format."""


Row = tuple[str, dict[str, Any]]


@dataclass
class RowErrors:
    """What to do with a bad row: raise :class:`DataError` naming it, or (``skip``) count it and go on."""

    skip: bool = False
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def bad(self, path: str | os.PathLike, error: DataError) -> None:
        if not self.skip:
            raise error
        self.skipped[str(path)] += 1
        self.first.setdefault(str(path), str(error))

    def report(self) -> str | None:
        """One line per file that had bad rows (count and the first problem), or None if none had."""
        if not self.skipped:
            return None
        lines = [f"skipped {sum(self.skipped.values())} bad row(s) (--skip-bad-rows):"]
        lines += [f"  {path}: {n}, the first: {self.first[path]}" for path, n in self.skipped.items()]
        return "\n".join(lines)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")


def _read_text(path: Path) -> str:
    _check_file(path)
    try:
        return path.read_text(encoding="utf-8-sig")  # MRPC's files start with a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _lines(text: str) -> list[str]:
    """The lines of a text, split at newlines only: JSON strings may hold U+2028 and other separators."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def detect_format(path: str | os.PathLike, requested: str = "auto") -> str:
    """The format of a data file: ``requested`` unless it is ``auto``, else from its name and content.

    ``.jsonl`` JSON lines; ``.csv``/``.tsv`` tables; ``.json`` a SQuAD file (``{"data": [...]}``), a
    JSON list of rows, or JSON lines (as ``datasets`` writes them); any other file JSON lines if it
    starts with ``{``, else CoNLL.
    """
    if requested not in FORMATS:
        raise DataError(f"unknown data format {requested!r}; choose one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    text = _read_text(path)
    if suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return "jsonl"
        if isinstance(value, dict) and isinstance(value.get("data"), list):
            return "squad"
        return "json" if isinstance(value, list) else "jsonl"
    return "jsonl" if text.lstrip().startswith("{") else "conll"


def read_jsonl(path: str | os.PathLike) -> list[Row]:
    """``("FILE:LINE", object)`` for each non-blank line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(_lines(_read_text(path)), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        rows.append((where, value))
    return _nonempty(path, rows)


def _nonempty(path: Path, rows: list) -> list:
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def read_json_list(path: str | os.PathLike) -> list[Row]:
    """A JSON array of objects: ``("FILE: item N", object)``."""
    path = Path(path)
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    rows = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {index}: expected a JSON object, got {type(item).__name__}")
        rows.append((f"{path}: item {index}", item))
    return _nonempty(path, rows)


def read_table(path: str | os.PathLike, delimiter: str, column_names: list[str] | None = None,
               errors: RowErrors | None = None) -> list[Row]:
    """The rows of a CSV/TSV file as dicts keyed by its header (or by ``column_names`` if it has none).

    A row with a different number of fields than the header is a bad row.
    """
    path, errors = Path(path), errors or RowErrors()
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    header = list(column_names) if column_names else next(reader, None)
    if not header:
        raise DataError(f"{path} is empty: expected a header line naming the columns")
    rows = []
    start = reader.line_num + 1  # a quoted field may span lines: a row is where it starts
    for values in reader:
        where, start = f"{path}:{start}", reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            errors.bad(path, DataError(f"{where}: {len(values)} fields, but the header has {len(header)} "
                                       f"({', '.join(header)})"))
            continue
        rows.append((where, dict(zip(header, values, strict=True))))
    return _nonempty(path, rows)


def read_records(path: str | os.PathLike, fmt: str, column_names: list[str] | None = None,
                 errors: RowErrors | None = None) -> list[Row]:
    """The rows of a JSON lines, JSON array, CSV or TSV file."""
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "json":
        return read_json_list(path)
    if fmt in ("csv", "tsv"):
        return read_table(path, "," if fmt == "csv" else "\t", column_names, errors)
    raise DataError(f"{path}: {fmt} files do not hold rows of named fields")


@dataclass(frozen=True)
class Columns:
    text: str
    text_pair: str | None
    label: str | None


def infer_columns(names: Iterable[str], source: str, text: str | None = None, text_pair: str | None = None,
                  label: str | None = None, labelled: bool = True) -> Columns:
    """Which of ``names`` hold the text, the optional second text and the label.

    Given columns must exist; the others are found by name (:data:`TEXT_COLUMNS`, :data:`LABEL_COLUMNS`,
    case-insensitively). ``labelled=False`` (prediction) needs no label column.
    """
    names = list(dict.fromkeys(names))
    by_lower = {n.lower(): n for n in reversed(names)}  # the first spelling wins
    shown = ", ".join(repr(n) for n in names)

    def given(name: str, option: str) -> str:
        if name in names:
            return name
        if name.lower() in by_lower:
            return by_lower[name.lower()]
        raise DataError(f"{source}: no column {name!r} ({option}); the columns are {shown}")

    if text is not None:
        columns = (given(text, "--text-column"),
                   given(text_pair, "--text-pair-column") if text_pair is not None else None)
    else:
        found = next(((first, second) for first, second in TEXT_COLUMNS
                      if first in by_lower and (second is None or second in by_lower)), None)
        if found is None:
            raise DataError(f"{source}: cannot tell which columns hold the text (columns: {shown}); "
                            "set --text-column (and --text-pair-column for pairs)")
        columns = (by_lower[found[0]], by_lower[found[1]] if found[1] else None)
    if label is not None:
        label_column = given(label, "--label-column")
    else:
        label_column = next((by_lower[n] for n in LABEL_COLUMNS if n in by_lower), None)
        if label_column is None and labelled:
            raise DataError(f"{source}: cannot tell which column holds the label (columns: {shown}); "
                            "set --label-column")
    return Columns(*columns, label_column if labelled else None)


def read_conll(path: str | os.PathLike, errors: RowErrors | None = None,
               labelled: bool = True) -> list[tuple[str, list[str], list[str]]]:
    """``(where, tokens, tags)`` per sentence of a CoNLL file.

    One token per line, its tag in the last column (space- or tab-separated), a blank line between
    sentences; ``-DOCSTART-`` lines are skipped. Every line must have as many columns as the file's
    first; a sentence with a ragged line is a bad row. ``labelled=False`` (prediction) also reads
    files of tokens alone, and gives no tags.
    """
    path, errors = Path(path), errors or RowErrors()
    sentences: list[tuple[str, list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    start, problem = "", None
    width: tuple[int, int] | None = None  # (columns, line that set it)

    def flush() -> None:
        nonlocal tokens, tags, problem
        if problem is not None:
            errors.bad(path, problem)
        elif tokens:
            sentences.append((start, tokens, tags))
        tokens, tags, problem = [], [], None

    for number, line in enumerate(_lines(_read_text(path)), start=1):
        parts = line.strip().split("\t") if "\t" in line else line.split()
        parts = [p.strip() for p in parts]
        if not line.strip() or parts[0] == "-DOCSTART-":
            flush()
            continue
        if not tokens and problem is None:
            start = f"{path}:{number}"
        if len(parts) < (2 if labelled else 1) or not all(parts):
            problem = problem or DataError(f"{path}:{number}: expected a token and its tag, got {line.strip()!r}")
            continue
        if width is None:
            width = (len(parts), number)
        elif len(parts) != width[0]:
            problem = problem or DataError(f"{path}:{number}: {len(parts)} columns, but line {width[1]} has "
                                           f"{width[0]} (a ragged line)")
            continue
        tokens.append(parts[0])
        if labelled:
            tags.append(parts[-1])
    flush()
    return _nonempty(path, sentences)


def read_squad(path: str | os.PathLike, errors: RowErrors | None = None) -> list[Row]:
    """The questions of a SQuAD v1.1 / v2.0 file as flat rows.

    Each row: ``id``, ``question``, ``context``, ``answers`` (a list of ``{"text", "answer_start"}``) and
    ``is_impossible`` (v2.0). ``where`` is the question's id and JSON path: SQuAD files are one line.
    """
    path, errors = Path(path), errors or RowErrors()
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise DataError(f'{path}: expected a SQuAD file, {{"data": [{{"paragraphs": [...]}}, ...]}}')
    rows = []
    for i, article in enumerate(value["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            errors.bad(path, DataError(f"{path}: data[{i}] has no list of paragraphs"))
            continue
        for j, paragraph in enumerate(paragraphs):
            at = f"data[{i}].paragraphs[{j}]"
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list) or not isinstance(paragraph.get("context"), str):
                errors.bad(path, DataError(f"{path}: {at} needs a string 'context' and a list 'qas'"))
                continue
            for k, qa in enumerate(qas):
                if not isinstance(qa, dict):
                    errors.bad(path, DataError(f"{path}: {at}.qas[{k}] is not a JSON object"))
                    continue
                where = f"{path}: question {qa.get('id', '?')!r} ({at}.qas[{k}])"
                rows.append((where, {**qa, "context": paragraph["context"]}))
    return _nonempty(path, rows)

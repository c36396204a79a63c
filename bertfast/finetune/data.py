"""Readers of fine-tuning data: JSONL files, one example per line, checked field by field.

Formats (one JSON object per line; blank lines are skipped):

* classification: ``{"text": str, "label": str | int}``, optionally ``"text_pair": str``; with
  regression the label is a number.
* token classification: ``{"tokens": [str, ...], "tags": [str, ...]}`` of equal lengths.
* multiple choice: ``{"context": str, "choices": [str, ...], "label": int}`` (an index into choices).
* question answering: ``{"question": str, "context": str, "answer": {"text": str, "start": int}}``,
  ``start`` being the character offset of the answer in the context.

A line that breaks its format raises :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file is missing, empty, or holds a line that breaks its format."""


@dataclass
class ClassificationExample:
    where: str
    text: str
    text_pair: str | None
    label: str | int | float


@dataclass
class TokenExample:
    where: str
    tokens: list[str]
    tags: list[str]


@dataclass
class ChoiceExample:
    where: str
    context: str
    choices: list[str]
    label: int


@dataclass
class QAExample:
    where: str
    question: str
    context: str
    answer_text: str
    answer_start: int


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``("FILE:LINE", object)`` for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, start=1):
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
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def _field(where: str, row: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} must be {what}, got {value!r}")
    return value


def _strings(where: str, row: dict[str, Any], name: str) -> list[str]:
    values = _field(where, row, name, list, "a list of strings")
    if not values or not all(isinstance(v, str) for v in values):
        raise DataError(f"{where}: field {name!r} must be a non-empty list of strings")
    return values


def read_classification(path: str | os.PathLike, regression: bool = False) -> list[ClassificationExample]:
    examples = []
    for where, row in read_jsonl(path):
        text = _field(where, row, "text", str, "a string")
        pair = _field(where, row, "text_pair", str, "a string") if row.get("text_pair") is not None else None
        if regression:
            label = float(_field(where, row, "label", (int, float), "a number (--regression)"))
        else:
            label = _field(where, row, "label", (str, int), "a string or an integer (numbers need --regression)")
        examples.append(ClassificationExample(where, text, pair, label))
    return examples


def read_token_classification(path: str | os.PathLike) -> list[TokenExample]:
    examples = []
    for where, row in read_jsonl(path):
        tokens, tags = _strings(where, row, "tokens"), _strings(where, row, "tags")
        if len(tokens) != len(tags):
            raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
        examples.append(TokenExample(where, tokens, tags))
    return examples


def read_multiple_choice(path: str | os.PathLike) -> list[ChoiceExample]:
    examples = []
    for where, row in read_jsonl(path):
        context = _field(where, row, "context", str, "a string")
        choices = _strings(where, row, "choices")
        label = _field(where, row, "label", int, "an integer")
        if not 0 <= label < len(choices):
            raise DataError(f"{where}: label {label} is not an index into the {len(choices)} choices")
        examples.append(ChoiceExample(where, context, choices, label))
    if len({len(e.choices) for e in examples}) > 1:
        first = examples[0]
        odd = next(e for e in examples if len(e.choices) != len(first.choices))
        raise DataError(f"{odd.where}: {len(odd.choices)} choices, but {first.where} has {len(first.choices)}; "
                        "every example needs the same number")
    return examples


def read_question_answering(path: str | os.PathLike) -> list[QAExample]:
    examples = []
    for where, row in read_jsonl(path):
        question = _field(where, row, "question", str, "a string")
        context = _field(where, row, "context", str, "a string")
        answer = _field(where, row, "answer", dict, 'an object {"text": ..., "start": ...}')
        text = _field(where, answer, "text", str, "a string")
        start = _field(where, answer, "start", int, "an integer")
        if not text or context[start:start + len(text)] != text:
            raise DataError(f"{where}: the answer {text!r} is not at character {start} of the context")
        examples.append(QAExample(where, question, context, text, start))
    return examples

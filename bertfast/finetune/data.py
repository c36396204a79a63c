"""Readers of fine-tuning examples, per task, from the formats of :mod:`bertfast.finetune.formats`.

* classification: JSON lines / JSON / CSV / TSV rows; the text, optional second text and label
  columns are inferred from their names (``sentence``, ``sentence1``/``sentence2``,
  ``premise``/``hypothesis``, ``question``/``sentence``, ``question1``/``question2``, ``text``/``text_pair``;
  ``label``/``labels``/``score``/...) or set by :class:`DataOptions`. With regression the label is a number.
* token classification: CoNLL files, or JSON lines with ``tokens`` and ``tags`` / ``ner_tags`` (tag
  names, or indices into ``label_names``).
* multiple choice: ``{"context": str, "choices": [str, ...], "label": int}`` (an index into choices).
* question answering: SQuAD v1.1/v2.0 JSON, the flat rows ``datasets`` exports
  (``"answers": {"text": [...], "answer_start": [...]}``, empty lists for an unanswerable question), or
  ``{"question", "context", "answer": {"text", "start"}}``.

A row that breaks its format raises :class:`DataError` naming the file and line, or is counted and
skipped when the :class:`RowErrors` says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from bertfast.finetune.formats import (
    DataError,
    Row,
    RowErrors,
    detect_format,
    infer_columns,
    read_conll,
    read_records,
    read_squad,
)


@dataclass
class DataOptions:
    """How to read a data file (the data options of ``bertfast finetune``/``predict``)."""

    format: str = "auto"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    column_names: list[str] | None = None  # a headerless table's columns, in order
    label_names: list[str] | None = None  # the label set, in id order; integer labels index into it
    labelled: bool = True  # False for prediction: labels are neither needed nor read


@dataclass
class ClassificationExample:
    where: str
    text: str
    text_pair: str | None
    label: str | int | float | None


@dataclass
class TokenExample:
    where: str
    tokens: list[str]
    tags: list[str] | None


@dataclass
class ChoiceExample:
    where: str
    context: str
    choices: list[str]
    label: int | None


@dataclass
class QAExample:
    where: str
    question: str
    context: str
    answer_text: str  # the answer trained on (the first reference); "" when unanswerable
    answer_start: int  # its character offset in the context; -1 when unanswerable
    answers: list[str]  # every reference answer (SQuAD's dev sets have several); [] when unanswerable
    id: str | None = None

    @property
    def impossible(self) -> bool:
        return self.answer_start < 0


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


def _each(path: str | os.PathLike, rows: list[Row], parse: Any, errors: RowErrors) -> list:
    """``parse(where, row)`` of every row; a row whose parse raises DataError goes to ``errors``."""
    examples = []
    for where, row in rows:
        try:
            examples.append(parse(where, row))
        except DataError as e:
            errors.bad(path, e)
    if not examples:
        raise DataError(f"{path} holds no usable examples")
    return examples


def _named_label(where: str, value: Any, names: list[str] | None, what: str) -> str | int:
    """A label as its name: an integer indexes ``names`` (as ``datasets`` exports class labels)."""
    if names is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(names):
            raise DataError(f"{where}: {what} {value} is not an index into the {len(names)} --label-names")
        return names[value]
    return value


def _formats_for(path: str | os.PathLike, options: DataOptions, allowed: tuple[str, ...], task: str) -> str:
    fmt = detect_format(path, options.format)
    if fmt not in allowed:
        raise DataError(f"{path}: {fmt} is not a {task} format (use {', '.join(allowed)}; --data-format sets it)")
    return fmt


def read_classification(path: str | os.PathLike, regression: bool = False, options: DataOptions | None = None,
                        errors: RowErrors | None = None) -> list[ClassificationExample]:
    options, errors = options or DataOptions(), errors or RowErrors()
    fmt = _formats_for(path, options, ("jsonl", "json", "csv", "tsv"), "classification")
    rows = read_records(path, fmt, options.column_names, errors)
    names = [name for _, row in rows for name in row]
    columns = infer_columns(names, str(path), options.text_column, options.text_pair_column,
                            options.label_column, options.labelled)
    table = fmt in ("csv", "tsv")

    def parse(where: str, row: dict[str, Any]) -> ClassificationExample:
        text = _field(where, row, columns.text, str, "a string")
        pair = None
        if columns.text_pair is not None and row.get(columns.text_pair) is not None:
            pair = _field(where, row, columns.text_pair, str, "a string")
        label = None
        if columns.label is not None:
            label = _field(where, row, columns.label, (str, int, float), "a string or a number")
            if isinstance(label, str) and not label.strip():
                raise DataError(f"{where}: field {columns.label!r} is empty")
            if regression:
                label = _number(where, columns.label, label)
            elif isinstance(label, float):
                raise DataError(f"{where}: field {columns.label!r} must be a string or an integer (numbers need "
                                f"--regression), got {label!r}")
            elif not table:
                label = _named_label(where, label, options.label_names, "label")
        return ClassificationExample(where, text, pair, label)

    return _each(path, rows, parse, errors)


def _number(where: str, name: str, value: Any) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if math.isnan(number) or math.isinf(number):
        raise DataError(f"{where}: field {name!r} must be a number (--regression), got {value!r}")
    return number


def read_token_classification(path: str | os.PathLike, options: DataOptions | None = None,
                              errors: RowErrors | None = None) -> list[TokenExample]:
    options, errors = options or DataOptions(), errors or RowErrors()
    fmt = _formats_for(path, options, ("conll", "jsonl", "json"), "token-classification")
    if fmt == "conll":
        return [TokenExample(where, tokens, tags if options.labelled else None)
                for where, tokens, tags in read_conll(path, errors, options.labelled)]
    rows = read_records(path, fmt, None, errors)
    tokens_field = options.text_column or "tokens"
    names = {name for _, row in rows for name in row}
    tags_field = options.label_column or next((n for n in ("tags", "ner_tags") if n in names), "tags")

    def parse(where: str, row: dict[str, Any]) -> TokenExample:
        tokens = _strings(where, row, tokens_field)
        if not options.labelled:
            return TokenExample(where, tokens, None)
        raw = _field(where, row, tags_field, list, "a list of tags")
        tags = [_named_label(where, t, options.label_names, "tag") for t in raw]
        if not tags or not all(isinstance(t, str) for t in tags):
            raise DataError(f"{where}: field {tags_field!r} must be a non-empty list of tag names "
                            "(integer tags need --label-names)")
        if len(tokens) != len(tags):
            raise DataError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
        return TokenExample(where, tokens, tags)

    return _each(path, rows, parse, errors)


def read_multiple_choice(path: str | os.PathLike, options: DataOptions | None = None,
                         errors: RowErrors | None = None) -> list[ChoiceExample]:
    options, errors = options or DataOptions(), errors or RowErrors()
    fmt = _formats_for(path, options, ("jsonl", "json"), "multiple-choice")

    def parse(where: str, row: dict[str, Any]) -> ChoiceExample:
        context = _field(where, row, "context", str, "a string")
        choices = _strings(where, row, "choices")
        if not options.labelled:
            return ChoiceExample(where, context, choices, None)
        label = _field(where, row, "label", int, "an integer")
        if not 0 <= label < len(choices):
            raise DataError(f"{where}: label {label} is not an index into the {len(choices)} choices")
        return ChoiceExample(where, context, choices, label)

    examples = _each(path, read_records(path, fmt, None, errors), parse, errors)
    first = examples[0]
    odd = next((e for e in examples if len(e.choices) != len(first.choices)), None)
    if odd is not None:
        raise DataError(f"{odd.where}: {len(odd.choices)} choices, but {first.where} has {len(first.choices)}; "
                        "every example needs the same number")
    return examples


def _answers(where: str, row: dict[str, Any]) -> list[tuple[str, int]]:
    """(text, start) of each reference answer, in any of the three QA row shapes."""
    if "answer" in row and "answers" not in row:  # {"answer": {"text", "start"}}
        answer = _field(where, row, "answer", dict, 'an object {"text": ..., "start": ...}')
        return [(_field(where, answer, "text", str, "a string"), _field(where, answer, "start", int, "an integer"))]
    answers = _field(where, row, "answers", (list, dict), "a list of answers or {\"text\": [...], "
                     "\"answer_start\": [...]}")
    if isinstance(answers, dict):  # datasets' flat export
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{where}: 'answers' needs equally long lists 'text' and 'answer_start'")
        answers = [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    pairs = []
    for answer in answers:
        if not isinstance(answer, dict):
            raise DataError(f"{where}: each answer must be an object, got {answer!r}")
        pairs.append((_field(where, answer, "text", str, "a string"),
                      _field(where, answer, "answer_start", int, "an integer")))
    return pairs


def read_question_answering(path: str | os.PathLike, options: DataOptions | None = None,
                            errors: RowErrors | None = None) -> list[QAExample]:
    options, errors = options or DataOptions(), errors or RowErrors()
    fmt = _formats_for(path, options, ("squad", "jsonl", "json"), "question-answering")
    rows = read_squad(path, errors) if fmt == "squad" else read_records(path, fmt, None, errors)

    def parse(where: str, row: dict[str, Any]) -> QAExample:
        question = _field(where, row, "question", str, "a string")
        context = _field(where, row, "context", str, "a string")
        ident = row.get("id")
        ident = None if ident is None else str(ident)
        if not options.labelled:
            return QAExample(where, question, context, "", -1, [], ident)
        answers = _answers(where, row)
        for text, start in answers:
            if not text or context[start:start + len(text)] != text:
                raise DataError(f"{where}: the answer {text!r} is not at character {start} of the context")
        impossible = row.get("is_impossible", not answers)
        if not isinstance(impossible, bool):
            raise DataError(f"{where}: field 'is_impossible' must be true or false, got {impossible!r}")
        if impossible != (not answers):
            raise DataError(f"{where}: is_impossible is {str(impossible).lower()} but the question has "
                            f"{len(answers)} answer(s)")
        if impossible:
            return QAExample(where, question, context, "", -1, [], ident)
        return QAExample(where, question, context, answers[0][0], answers[0][1], [t for t, _ in answers], ident)

    return _each(path, rows, parse, errors)

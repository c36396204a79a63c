"""The four fine-tuning tasks: each reads its data, sets up labels, encodes features and scores predictions.

A feature is one model input (a window of a long QA context is one feature of its example): a dict
of token id lists and labels that :func:`collate` pads into a batch, plus the bookkeeping (keys
starting with ``_``) that scoring needs to map predictions back to examples.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from bertfast import metrics
from bertfast.data import WordPieceTokenizer
from bertfast.finetune import data
from bertfast.finetune.config import TASKS
from bertfast.finetune.data import DataError, DataOptions, RowErrors
from bertfast.io import CheckpointError
from bertfast.models import (
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)

Feature = dict[str, Any]
IGNORE = -100  # label of positions the loss skips, as in transformers


def _plain(tokenizer: WordPieceTokenizer, seq_len: int | None) -> Tokenizer:
    """The fast tokenizer with our truncation and no padding (a tokenizer.json may carry its own)."""
    raw = tokenizer.tokenizer
    raw.no_padding()
    if seq_len is None:
        raw.no_truncation()
    else:
        raw.enable_truncation(max_length=seq_len, strategy="longest_first")
    return raw


def _sorted_labels(values: set) -> list:
    return sorted(values, key=lambda v: (isinstance(v, str), v if isinstance(v, int) else str(v)))


class Task(ABC):
    """``options`` say how to read data files; ``errors`` what to do with their bad rows."""

    name: str
    model_class: type
    main_metric: str

    def __init__(self, options: DataOptions | None = None, errors: RowErrors | None = None) -> None:
        self.options = options or DataOptions()
        self.errors = errors or RowErrors()

    @abstractmethod
    def read(self, path: str | os.PathLike) -> list:
        """The checked examples of a data file."""

    def label_config(self, train: list) -> dict[str, Any]:
        """Model config overrides for these training examples (the label set, the problem type)."""
        return {}

    def use_model_labels(self, config: Any) -> None:
        """Take the label set from a fine-tuned model's config (evaluation without training data)."""
        return None  # multiple choice and QA have no label set

    @abstractmethod
    def encode(self, examples: list, tokenizer: WordPieceTokenizer, seq_len: int) -> list[Feature]:
        """Model inputs and labels of the examples, truncated (or windowed) to ``seq_len`` tokens."""

    def split_outputs(self, output: Any, batch: dict[str, Tensor]) -> list[Any]:
        """The model's output for each feature of the batch, on the CPU, without padding."""
        return list(output.logits.float().cpu())

    @abstractmethod
    def predict(self, examples: list, features: list[Feature], outputs: list[Any]) -> list[Any]:
        """One prediction per example, in the data file's terms (a label, tags, a choice, answer text)."""

    @abstractmethod
    def gold(self, example: Any) -> Any:
        """The example's reference answer, in the same terms as :meth:`predict`."""

    @abstractmethod
    def score(self, examples: list, features: list[Feature], outputs: list[Any]) -> dict[str, float]:
        """The task's metrics of the per-feature outputs against the examples' labels."""

    @abstractmethod
    def describe(self, examples: list, features: list[Feature], outputs: list[Any]) -> list[dict[str, Any]]:
        """One record per example for ``bertfast predict``: the prediction with its probabilities or score."""

    def config_updates(self) -> dict[str, Any]:
        """Values learnt at evaluation that a saved model's config carries (QA's no-answer threshold)."""
        return {}


class _Labelled(Task):
    """Tasks whose labels are a set of names: from --label-names, the training data or a fine-tuned model."""

    labels: list | None = None

    def __init__(self, options: DataOptions | None = None, errors: RowErrors | None = None) -> None:
        super().__init__(options, errors)
        if self.options.label_names is not None:
            self._set_labels(list(self.options.label_names), "--label-names")

    def _set_labels(self, labels: list, source: str) -> None:
        self.labels, self.source = labels, source
        self.label2id = {label: i for i, label in enumerate(labels)}

    @abstractmethod
    def _example_labels(self, example: Any) -> list:
        """The labels an example carries (none when unlabelled)."""

    def _known_labels(self, path: str | os.PathLike, examples: list) -> list:
        """The examples whose labels are all in the label set; the others are bad rows."""
        if self.labels is None:
            return examples
        kept = []
        for e in examples:
            unknown = next((v for v in self._example_labels(e) if self._find_label(v) is None), None)
            if unknown is None:
                kept.append(e)
            else:
                self.errors.bad(path, DataError(f"{e.where}: label {unknown!r} does not occur in {self.source}"))
        if not kept:
            raise DataError(f"{path} holds no example with a known label")
        return kept

    def _label_ids(self, train_labels: set) -> dict[str, Any]:
        if self.labels is None:
            self._set_labels(_sorted_labels(train_labels), "the training data")
        id2label = {i: str(label) for i, label in enumerate(self.labels)}
        return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}

    def use_model_labels(self, config: Any) -> None:
        id2label = {int(i): label for i, label in (config.id2label or {}).items()}
        if sorted(id2label) != list(range(config.num_labels)):
            raise DataError(f"the model's config has no complete id2label for its {config.num_labels} labels")
        self._set_labels([id2label[i] for i in range(config.num_labels)], "the model's config")

    def _find_label(self, label: Any) -> int | None:
        # A config stores its labels as strings: integer labels of a data file match their str().
        for key in (label, str(label)):
            if key in self.label2id:
                return self.label2id[key]
        return None

    def _label_id(self, where: str, label: Any) -> int:
        found = self._find_label(label)
        if found is None:
            raise DataError(f"{where}: label {label!r} does not occur in {self.source}")
        return found


class SequenceClassification(_Labelled):
    name = "classification"
    model_class = BertForSequenceClassification

    def __init__(self, regression: bool = False, options: DataOptions | None = None,
                 errors: RowErrors | None = None) -> None:
        super().__init__(options, errors)
        self.regression = regression
        self.main_metric = "pearson" if regression else "accuracy"

    def read(self, path: str | os.PathLike) -> list[data.ClassificationExample]:
        examples = data.read_classification(path, self.regression, self.options, self.errors)
        return examples if self.regression else self._known_labels(path, examples)

    def _example_labels(self, example: data.ClassificationExample) -> list:
        return [] if example.label is None else [example.label]

    def label_config(self, train: list[data.ClassificationExample]) -> dict[str, Any]:
        if self.regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {**self._label_ids({e.label for e in train}), "problem_type": "single_label_classification"}

    def encode(self, examples: list[data.ClassificationExample], tokenizer: WordPieceTokenizer,
               seq_len: int) -> list[Feature]:
        raw = _plain(tokenizer, seq_len)
        features = []
        for e in examples:
            enc = raw.encode(e.text, e.text_pair) if e.text_pair is not None else raw.encode(e.text)
            feature = {"input_ids": enc.ids, "token_type_ids": enc.type_ids}
            if e.label is not None:
                feature["labels"] = e.label if self.regression else self._label_id(e.where, e.label)
            features.append(feature)
        return features

    def predict(self, examples: list, features: list[Feature], outputs: list[Tensor]) -> list[Any]:
        if self.regression:
            return [o.item() for o in outputs]
        return [self.labels[int(o.argmax())] for o in outputs]

    def gold(self, example: data.ClassificationExample) -> Any:
        return example.label

    def score(self, examples: list, features: list[Feature], outputs: list[Tensor]) -> dict[str, float]:
        references = [f["labels"] for f in features]
        if self.regression:
            predicted = self.predict(examples, features, outputs)
            return {"pearson": metrics.pearson(predicted, references),
                    "spearman": metrics.spearman(predicted, references),
                    "mse": sum((p - r) ** 2 for p, r in zip(predicted, references, strict=True)) / len(predicted)}
        predicted = [int(o.argmax()) for o in outputs]
        scores = {"accuracy": metrics.accuracy(predicted, references),
                  "f1_macro": metrics.f1_macro(predicted, references),
                  "matthews": metrics.matthews_corrcoef(predicted, references)}
        if len(self.labels) == 2:
            scores["f1"] = metrics.f1_binary(predicted, references, positive=1)
        return scores

    def describe(self, examples: list, features: list[Feature], outputs: list[Tensor]) -> list[dict[str, Any]]:
        if self.regression:
            return [{"score": o.item()} for o in outputs]
        records = []
        for o in outputs:
            probabilities = o.softmax(-1).tolist()
            records.append({"label": str(self.labels[int(o.argmax())]),
                            "probabilities": {str(label): p for label, p in zip(self.labels, probabilities,
                                                                                strict=True)}})
        return records


class TokenClassification(_Labelled):
    """Each word's tag sits on its first word piece; the other pieces and special tokens are ignored."""

    name = "token-classification"
    model_class = BertForTokenClassification
    main_metric = "f1"

    def read(self, path: str | os.PathLike) -> list[data.TokenExample]:
        return self._known_labels(path, data.read_token_classification(path, self.options, self.errors))

    def _example_labels(self, example: data.TokenExample) -> list:
        return example.tags or []

    def label_config(self, train: list[data.TokenExample]) -> dict[str, Any]:
        return self._label_ids({t for e in train for t in e.tags})

    def encode(self, examples: list[data.TokenExample], tokenizer: WordPieceTokenizer,
               seq_len: int) -> list[Feature]:
        raw = _plain(tokenizer, seq_len)
        features = []
        for e in examples:
            enc = raw.encode(e.tokens, is_pretokenized=True)
            labels, firsts, previous = [], [], None
            for position, word in enumerate(enc.word_ids):
                if word is not None and word != previous:
                    labels.append(self._label_id(e.where, e.tags[word]) if e.tags is not None else IGNORE)
                    firsts.append((word, position))
                else:
                    labels.append(IGNORE)
                previous = word
            feature = {"input_ids": enc.ids, "token_type_ids": enc.type_ids, "_firsts": firsts}
            if e.tags is not None:
                feature["labels"] = labels
            features.append(feature)
        return features

    def split_outputs(self, output: Any, batch: dict[str, Tensor]) -> list[Tensor]:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [row[:n] for row, n in zip(output.logits.float().cpu(), lengths, strict=True)]

    def predict(self, examples: list[data.TokenExample], features: list[Feature],
                outputs: list[Tensor]) -> list[list[str]]:
        predicted_tags = []
        for e, f, logits in zip(examples, features, outputs, strict=True):
            tags = ["O"] * len(e.tokens)  # words cut off by the length limit count as untagged
            for word, position in f["_firsts"]:
                tags[word] = str(self.labels[int(logits[position].argmax())])
            predicted_tags.append(tags)
        return predicted_tags

    def gold(self, example: data.TokenExample) -> list[str]:
        return example.tags

    def score(self, examples: list[data.TokenExample], features: list[Feature],
              outputs: list[Tensor]) -> dict[str, float]:
        predicted_tags = self.predict(examples, features, outputs)
        scored = [(tags[word], e.tags[word]) for tags, e, f in zip(predicted_tags, examples, features, strict=True)
                  for word, _ in f["_firsts"]]
        correct, total = sum(p == g for p, g in scored), len(scored)
        spans = metrics.span_f1(predicted_tags, [e.tags for e in examples])
        return {"f1": spans["f1"], "precision": spans["precision"], "recall": spans["recall"],
                "accuracy": correct / max(total, 1)}

    def describe(self, examples: list[data.TokenExample], features: list[Feature],
                 outputs: list[Tensor]) -> list[dict[str, Any]]:
        tags = self.predict(examples, features, outputs)
        return [{"tokens": e.tokens, "tags": t} for e, t in zip(examples, tags, strict=True)]


class MultipleChoice(Task):
    name = "multiple-choice"
    model_class = BertForMultipleChoice
    main_metric = "accuracy"

    def read(self, path: str | os.PathLike) -> list[data.ChoiceExample]:
        return data.read_multiple_choice(path, self.options, self.errors)

    def encode(self, examples: list[data.ChoiceExample], tokenizer: WordPieceTokenizer,
               seq_len: int) -> list[Feature]:
        raw = _plain(tokenizer, seq_len)
        features = []
        for e in examples:
            encs = [raw.encode(e.context, choice) for choice in e.choices]
            feature = {"input_ids": [enc.ids for enc in encs], "token_type_ids": [enc.type_ids for enc in encs]}
            if e.label is not None:
                feature["labels"] = e.label
            features.append(feature)
        return features

    def predict(self, examples: list, features: list[Feature], outputs: list[Tensor]) -> list[int]:
        return [int(o.argmax()) for o in outputs]

    def gold(self, example: data.ChoiceExample) -> int:
        return example.label

    def score(self, examples: list, features: list[Feature], outputs: list[Tensor]) -> dict[str, float]:
        predicted = self.predict(examples, features, outputs)
        return {"accuracy": metrics.accuracy(predicted, [f["labels"] for f in features])}

    def describe(self, examples: list, features: list[Feature], outputs: list[Tensor]) -> list[dict[str, Any]]:
        return [{"choice": int(o.argmax()), "probabilities": o.softmax(-1).tolist()} for o in outputs]


class QuestionAnswering(Task):
    """SQuAD-style extractive QA (v1.1, and v2.0 with unanswerable questions); long contexts are windowed.

    A window that does not hold the whole answer, and every window of an unanswerable question, is
    trained to point at [CLS] (position 0), as in transformers. An example's best span is the
    best-scoring one (start <= end, at most max_answer_length tokens) of the context over all its
    windows; its null score is the lowest [CLS] score (start + end logit) of its windows. A model
    trained with unanswerable questions (``version_2_with_negative`` in its config) answers "" when the
    null score beats the best span's by more than ``threshold``: 0 while training, then the threshold
    that maximised F1 on the evaluation data, which the saved model's config carries
    (``null_score_diff_threshold``).
    """

    name = "question-answering"
    model_class = BertForQuestionAnswering

    def __init__(self, max_answer_length: int = 30, options: DataOptions | None = None,
                 errors: RowErrors | None = None) -> None:
        super().__init__(options, errors)
        self.max_answer_length = max_answer_length
        self.with_negative = False
        self.threshold = 0.0
        self.tuned_threshold: float | None = None
        self.main_metric = "f1"

    def read(self, path: str | os.PathLike) -> list[data.QAExample]:
        return data.read_question_answering(path, self.options, self.errors)

    def label_config(self, train: list[data.QAExample]) -> dict[str, Any]:
        self._set_negative(any(e.impossible for e in train))
        return {"num_labels": 2, "version_2_with_negative": self.with_negative}

    def use_model_labels(self, config: Any) -> None:
        self._set_negative(bool(config.extra.get("version_2_with_negative", False)))
        self.threshold = float(config.extra.get("null_score_diff_threshold", 0.0))

    def _set_negative(self, with_negative: bool) -> None:
        self.with_negative = with_negative
        self.main_metric = "best_f1" if with_negative else "f1"

    def config_updates(self) -> dict[str, Any]:
        return {} if self.tuned_threshold is None else {"null_score_diff_threshold": self.tuned_threshold}

    def encode(self, examples: list[data.QAExample], tokenizer: WordPieceTokenizer,
               seq_len: int) -> list[Feature]:
        raw = _plain(tokenizer, None)
        features = []
        for index, e in enumerate(examples):
            question = raw.encode(e.question, add_special_tokens=False).ids[: max(1, seq_len // 2)]
            context = raw.encode(e.context, add_special_tokens=False)
            room = seq_len - len(question) - 3  # [CLS] question [SEP] window [SEP]
            if room < 1:
                raise DataError(f"{e.where}: seq-len {seq_len} leaves no room for the context")
            first = last = None
            if not e.impossible:
                answer_end = e.answer_start + len(e.answer_text)
                pieces = list(enumerate(context.offsets))
                first = next((i for i, (_, end) in pieces if end > e.answer_start), None)
                last = next((i for i, (start, _) in reversed(pieces) if start < answer_end), None)
            stride = max(1, room - room // 4)  # consecutive windows overlap by a quarter
            window_start = 0
            while True:
                window_end = min(window_start + room, len(context.ids))
                lead = len(question) + 2
                inside = first is not None and last is not None and window_start <= first <= last < window_end
                feature = {
                    "input_ids": [tokenizer.cls_id, *question, tokenizer.sep_id,
                                  *context.ids[window_start:window_end], tokenizer.sep_id],
                    "token_type_ids": [0] * lead + [1] * (window_end - window_start + 1),
                    "_example": index, "_lead": lead, "_offsets": context.offsets[window_start:window_end],
                }
                if self.options.labelled:
                    feature["start_positions"] = lead + first - window_start if inside else 0
                    feature["end_positions"] = lead + last - window_start if inside else 0
                features.append(feature)
                if window_end >= len(context.ids):
                    break
                window_start += stride
        return features

    def split_outputs(self, output: Any, batch: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        starts, ends = output.start_logits.float().cpu(), output.end_logits.float().cpu()
        return [(s[:n], e[:n]) for s, e, n in zip(starts, ends, lengths, strict=True)]

    def best_span(self, start_logits: Tensor, end_logits: Tensor) -> tuple[float, int, int]:
        """(score, start, end) of the best span with start <= end < start + max_answer_length."""
        scores = start_logits[:, None] + end_logits[None, :]
        n = scores.shape[0]
        allowed = torch.ones(n, n, dtype=torch.bool).triu().tril(self.max_answer_length - 1)
        flat = scores.masked_fill(~allowed, float("-inf")).flatten()
        best = int(flat.argmax())
        return float(flat[best]), best // n, best % n

    def decode(self, examples: list[data.QAExample], features: list[Feature],
               outputs: list[tuple[Tensor, Tensor]]) -> list[tuple[str, float, float, float]]:
        """Per example: (best span's text, its score, its probability in its window, the null score)."""
        best: dict[int, tuple[float, str, float]] = {}
        null: dict[int, float] = {}
        for f, (start_logits, end_logits) in zip(features, outputs, strict=True):
            index, lead, offsets = f["_example"], f["_lead"], f["_offsets"]
            null[index] = min(null.get(index, math.inf), float(start_logits[0] + end_logits[0]))
            if not offsets:
                continue
            window = slice(lead, lead + len(offsets))
            value, start, end = self.best_span(start_logits[window], end_logits[window])
            if index not in best or value > best[index][0]:
                probability = float(start_logits.softmax(0)[lead + start] * end_logits.softmax(0)[lead + end])
                context = examples[index].context
                best[index] = (value, context[offsets[start][0]:offsets[end][1]], probability)
        decoded = []
        for i in range(len(examples)):
            value, text, probability = best.get(i, (-math.inf, "", 0.0))
            decoded.append((text, value, probability, null[i]))
        return decoded

    def _answers(self, decoded: list[tuple[str, float, float, float]]) -> list[str]:
        return ["" if self.with_negative and null - value > self.threshold else text
                for text, value, _, null in decoded]

    def predict(self, examples: list[data.QAExample], features: list[Feature],
                outputs: list[tuple[Tensor, Tensor]]) -> list[str]:
        return self._answers(self.decode(examples, features, outputs))

    def gold(self, example: data.QAExample) -> str:
        return example.answer_text

    def score(self, examples: list[data.QAExample], features: list[Feature],
              outputs: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """SQuAD v1.1's exact match and F1, or with unanswerable questions v2.0's official metrics.

        For v2.0 the no-answer score of a question is (null score - best span score); the scores
        at ``threshold`` are ``exact``/``f1``, and the threshold search gives ``best_*`` (its F1
        threshold becomes the saved model's).
        """
        decoded = self.decode(examples, features, outputs)
        references = [e.answers for e in examples]
        if not self.with_negative and not any(e.impossible for e in examples):
            return metrics.squad_v1_scores([text for text, *_ in decoded], references)
        na_probs = [null - value for _, value, _, null in decoded] if self.with_negative else None
        scores = metrics.squad_v2_scores([text for text, *_ in decoded], references, na_probs,
                                         self.threshold if self.with_negative else 1.0)
        if self.with_negative:
            self.tuned_threshold = scores["best_f1_thresh"]
        return scores

    def describe(self, examples: list[data.QAExample], features: list[Feature],
                 outputs: list[tuple[Tensor, Tensor]]) -> list[dict[str, Any]]:
        decoded = self.decode(examples, features, outputs)
        records = []
        for e, answer, (_, value, probability, null) in zip(examples, self._answers(decoded), decoded, strict=True):
            record: dict[str, Any] = {"id": e.id} if e.id is not None else {}
            record.update(answer=answer, score=probability if answer else None)
            if self.with_negative:
                record["null_score_diff"] = null - value
            records.append(record)
        return records


def make_task(name: str, regression: bool = False, max_answer_length: int = 30,
              options: DataOptions | None = None, errors: RowErrors | None = None) -> Task:
    if regression and name != "classification":
        raise ValueError("--regression applies to --task classification only")
    if name == "classification":
        return SequenceClassification(regression, options, errors)
    if name == "token-classification":
        return TokenClassification(options, errors)
    if name == "multiple-choice":
        return MultipleChoice(options, errors)
    if name == "question-answering":
        return QuestionAnswering(max_answer_length, options, errors)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


ARCHITECTURES = {"BertForSequenceClassification": "classification",
                 "BertForTokenClassification": "token-classification",
                 "BertForMultipleChoice": "multiple-choice", "BertForQuestionAnswering": "question-answering"}


def task_of(config: Any, source: str) -> str:
    """The task a fine-tuned model's config (its ``architectures``) was trained for."""
    for architecture in config.architectures or []:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    raise CheckpointError(f"{source} is not a fine-tuned model of a known task (architectures: "
                          f"{config.architectures}); pass --task")


def load_fine_tuned(path: str | os.PathLike, task_name: str, regression: bool = False, max_answer_length: int = 30,
                    options: DataOptions | None = None, errors: RowErrors | None = None) -> tuple[Any, Task]:
    """A fine-tuned model to use as it is, and its task set up from its config (labels, QA threshold).

    Every weight of the task's head must be in the checkpoint: a random head would give random answers.
    """
    model_class = make_task(task_name, regression).model_class
    model, info = model_class.from_pretrained(path, output_loading_info=True)
    if info["missing_keys"]:
        raise CheckpointError(f"{path} is not a fine-tuned {task_name} model: it has no weights for "
                              f"{', '.join(info['missing_keys'])}")
    regression = regression or model.config.problem_type == "regression"
    task = make_task(task_name, regression, max_answer_length, options, errors)
    task.use_model_labels(model.config)
    return model, task


def _pad(rows: list[list[int]], value: int, length: int) -> list[list[int]]:
    return [row + [value] * (length - len(row)) for row in rows]


def collate(features: list[Feature], pad_id: int) -> dict[str, Tensor]:
    """Pad a list of features into model inputs (multiple choice: (batch, choices, length))."""
    choices = isinstance(features[0]["input_ids"][0], list)
    rows = [r for f in features for r in (f["input_ids"] if choices else [f["input_ids"]])]
    types = [r for f in features for r in (f["token_type_ids"] if choices else [f["token_type_ids"]])]
    length = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.tensor(_pad(rows, pad_id, length)),
        "token_type_ids": torch.tensor(_pad(types, 0, length)),
        "attention_mask": torch.tensor(_pad([[1] * len(r) for r in rows], 0, length)),
    }
    if choices:
        batch = {k: v.view(len(features), -1, length) for k, v in batch.items()}
    for key in ("labels", "start_positions", "end_positions"):
        if key in features[0]:
            values = [f[key] for f in features]
            if isinstance(values[0], list):
                values = _pad(values, IGNORE, length)
            batch[key] = torch.tensor(values)
    return batch

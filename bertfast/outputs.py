"""Model outputs with transformers' field names: attribute access, and indexing over the set fields."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor


@dataclass
class ModelOutput:
    """Like transformers' ModelOutput: ``out.logits``, ``out["logits"]``, ``out[0]`` and ``out.to_tuple()``.

    Integer indexing counts only fields that are not None, in declaration order, as transformers does.
    """

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Tensor | None = None
    pooler_output: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    """transformers' fields, then the parts of the loss and the accuracies (no grad) for training logs."""

    loss: Tensor | None = None
    prediction_logits: Tensor | None = None
    seq_relationship_logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    mlm_loss: Tensor | None = None
    nsp_loss: Tensor | None = None
    mlm_accuracy: Tensor | None = None
    nsp_accuracy: Tensor | None = None
    mlm_count: Tensor | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    mlm_accuracy: Tensor | None = None
    mlm_count: Tensor | None = None


@dataclass
class ClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class NextSentencePredictorOutput(ClassifierOutput):
    """logits: (batch, 2), index 0 = "B follows A"."""


class SequenceClassifierOutput(ClassifierOutput):
    """logits: (batch, num_labels)."""


class TokenClassifierOutput(ClassifierOutput):
    """logits: (batch, seqlen, num_labels), zeros at padded positions."""


class MultipleChoiceModelOutput(ClassifierOutput):
    """logits: (batch, num_choices)."""


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None

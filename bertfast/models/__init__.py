"""BERT models with transformers' class names, constructors, forward arguments and outputs."""

import torch

from bertfast.models.base import BertModel, BertPreTrainedModel, Encoded
from bertfast.models.classification import (
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from bertfast.models.pretraining import BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining

_MODEL_CLASSES = (BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
                  BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering,
                  BertForMultipleChoice)


def from_transformers(model: torch.nn.Module) -> BertPreTrainedModel:
    """The bertfast twin of a live transformers BERT model: same class name, config and weights."""
    cls = {c.__name__: c for c in _MODEL_CLASSES}.get(type(model).__name__)
    if cls is None:
        names = ", ".join(c.__name__ for c in _MODEL_CLASSES)
        raise TypeError(f"cannot convert {type(model).__name__}: bertfast has {names}")
    return cls.from_transformers(model)


__all__ = [
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForNextSentencePrediction",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BertPreTrainedModel",
    "Encoded",
    "from_transformers",
]

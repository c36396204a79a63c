"""BERT models with transformers' class names, constructors, forward arguments and outputs."""

from bertfast.models.base import BertModel, BertPreTrainedModel, Encoded
from bertfast.models.classification import (
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from bertfast.models.pretraining import BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining

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
]

"""Fine-tuning heads: sentence (pair) classification, token classification, extractive QA, multiple choice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertfast import ops
from bertfast.config import BertConfig
from bertfast.models.base import BertModel, BertPreTrainedModel, check_no_attentions
from bertfast.outputs import (
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)


def _classifier_dropout(config: BertConfig) -> nn.Dropout:
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p)


class BertForSequenceClassification(BertPreTrainedModel):
    """[CLS] classification of one sentence or a sentence pair; regression when num_labels == 1."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> SequenceClassifierOutput | tuple:
        check_no_attentions(output_attentions)
        encoded = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                   bool(output_hidden_states))
        logits = self.classifier(self.dropout(encoded.pooled))
        out = SequenceClassifierOutput(logits=logits, hidden_states=encoded.padded_states())
        if labels is not None:
            out.loss = self._loss(logits, labels)
        return self._finish(out, return_dict)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        # The same problem_type inference as transformers, recorded in the config.
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class BertForTokenClassification(BertPreTrainedModel):
    """A label per token (POS tagging, NER). The classifier runs on real tokens only."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> TokenClassifierOutput | tuple:
        """Labels of -100, and labels at padded positions, are ignored."""
        check_no_attentions(output_attentions)
        encoded = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                   bool(output_hidden_states))
        packed_logits = self.classifier(self.dropout(encoded.hidden))
        out = TokenClassifierOutput(
            logits=encoded.packing.unpack(packed_logits), hidden_states=encoded.padded_states()
        )
        if labels is not None:
            expected = (encoded.packing.batch, encoded.packing.seqlen)
            if tuple(labels.shape) != expected:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {expected}: one label per token")
            packed_labels = encoded.packing.pack(labels)
            # The mean over labelled tokens; with none it is 0, not NaN (and no branch on the data).
            total = F.cross_entropy(packed_logits.float(), packed_labels, ignore_index=ops.IGNORE_INDEX,
                                    reduction="sum")
            out.loss = total / (packed_labels != ops.IGNORE_INDEX).sum().clamp(min=1)
        return self._finish(out, return_dict)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Extractive QA: start and end logits of the answer span over the passage tokens."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"BertForQuestionAnswering needs num_labels=2 (start, end), got {config.num_labels}")
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        start_positions: Tensor | None = None,
        end_positions: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> QuestionAnsweringModelOutput | tuple:
        """Padded positions get the lowest finite logit, so neither a span nor the loss can use them.

        As in transformers, positions outside the sequence are clamped to seq_len and ignored.
        """
        check_no_attentions(output_attentions)
        encoded = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                   bool(output_hidden_states))
        packed = self.qa_outputs(encoded.hidden)
        logits = encoded.packing.unpack(packed, fill=torch.finfo(packed.dtype).min)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        out = QuestionAnsweringModelOutput(
            start_logits=start_logits, end_logits=end_logits, hidden_states=encoded.padded_states()
        )
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            start = start_positions.view(-1).clamp(0, ignored)
            end = end_positions.view(-1).clamp(0, ignored)
            out.loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
            ) / 2
        return self._finish(out, return_dict)


class BertForMultipleChoice(BertPreTrainedModel):
    """Scores each of num_choices (batch, num_choices, seq_len) candidates from its [CLS]."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> MultipleChoiceModelOutput | tuple:
        check_no_attentions(output_attentions)
        lead = input_ids if input_ids is not None else inputs_embeds
        if lead is None or lead.dim() < 3:
            raise ValueError("multiple choice inputs must be (batch, num_choices, seq_len)")
        num_choices = lead.shape[1]

        def flat(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(-1, *t.shape[2:])

        encoded = self.bert.encode(flat(input_ids), flat(attention_mask), flat(token_type_ids),
                                   flat(position_ids), flat(inputs_embeds), bool(output_hidden_states))
        logits = self.classifier(self.dropout(encoded.pooled)).view(-1, num_choices)
        out = MultipleChoiceModelOutput(logits=logits, hidden_states=encoded.padded_states())
        if labels is not None:
            out.loss = F.cross_entropy(logits.float(), labels.view(-1))
        return self._finish(out, return_dict)

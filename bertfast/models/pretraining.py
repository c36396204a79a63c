"""Pretraining heads: masked LM and next-sentence prediction.

With labels, the MLM head runs only on the positions whose label is not -100:
they are gathered from the packed encoder output and the prediction head and
the cross-entropy see nothing else, so the (batch, seq, vocab) logits are never
built for the loss. Pass ``return_logits=True`` to get them as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bertfast import ops
from bertfast.config import BertConfig
from bertfast.models.base import BertModel, BertPreTrainedModel, Encoded, _check_range, check_no_attentions
from bertfast.modules import BertOnlyMLMHead, BertOnlyNSPHead, BertPreTrainingHeads
from bertfast.outputs import BertForPreTrainingOutput, MaskedLMOutput, NextSentencePredictorOutput
from bertfast.padding import kept_positions

IGNORE_INDEX = ops.IGNORE_INDEX


def _masked_lm(
    head, encoded: Encoded, labels: Tensor, vocab_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, accuracy, count) of the MLM head over the labelled positions only.

    Labels at padded positions are ignored. With no labelled position the loss is 0 (not NaN).
    """
    if labels.shape != (encoded.packing.batch, encoded.packing.seqlen):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, expected "
            f"{(encoded.packing.batch, encoded.packing.seqlen)}"
        )
    packed_labels = encoded.packing.pack(labels)
    rows = kept_positions(packed_labels != IGNORE_INDEX)
    chosen = packed_labels.index_select(0, rows)
    _check_range("labels", chosen, vocab_size, "vocab_size; use -100 for positions without a label")
    loss, n_correct = head.loss(encoded.select(rows), chosen)
    count = torch.tensor(rows.numel(), device=loss.device)
    return loss, n_correct / count.clamp(min=1), count


def _loss_only_positions(labels: Tensor | None, return_logits: bool) -> Tensor | None:
    """With labels and no logits asked for, only the labelled positions need the last layer."""
    return labels != IGNORE_INDEX if labels is not None and not return_logits else None


def _next_sentence(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    labels = labels.view(-1)
    _check_range("next_sentence_label", labels, 2, "0 = B follows A, 1 = B is random")
    loss = F.cross_entropy(logits.view(-1, 2).float(), labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, accuracy.detach()


def _full_logits(head, encoded: Encoded) -> Tensor:
    return encoded.packing.unpack(head(encoded.hidden))


class BertForPreTraining(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        next_sentence_label: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool = False,
    ) -> BertForPreTrainingOutput | tuple:
        """loss = MLM loss (masked positions only) + NSP loss, each when its labels are given.

        With ``labels``, ``prediction_logits`` is None unless ``return_logits=True``.
        """
        check_no_attentions(output_attentions)
        encoded = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                   bool(output_hidden_states), needed=_loss_only_positions(labels, return_logits))
        out = BertForPreTrainingOutput(
            seq_relationship_logits=self.cls.seq_relationship(encoded.pooled),
            hidden_states=encoded.padded_states(),
        )
        losses = []
        if labels is not None:
            out.mlm_loss, out.mlm_accuracy, out.mlm_count = _masked_lm(
                self.cls.predictions, encoded, labels, self.config.vocab_size
            )
            losses.append(out.mlm_loss)
        if labels is None or return_logits:
            out.prediction_logits = _full_logits(self.cls.predictions, encoded)
        if next_sentence_label is not None:
            out.nsp_loss, out.nsp_accuracy = _next_sentence(out.seq_relationship_logits, next_sentence_label)
            losses.append(out.nsp_loss)
        if losses:
            out.loss = sum(losses)
        return self._finish(out, return_dict)


class BertForMaskedLM(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
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
        return_logits: bool = False,
    ) -> MaskedLMOutput | tuple:
        """With ``labels``, ``logits`` is None unless ``return_logits=True`` (the loss never needs them)."""
        check_no_attentions(output_attentions)
        encoded = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                   bool(output_hidden_states), needed=_loss_only_positions(labels, return_logits))
        out = MaskedLMOutput(hidden_states=encoded.padded_states())
        if labels is not None:
            out.loss, out.mlm_accuracy, out.mlm_count = _masked_lm(
                self.cls.predictions, encoded, labels, self.config.vocab_size
            )
        if labels is None or return_logits:
            out.logits = _full_logits(self.cls.predictions, encoded)
        return self._finish(out, return_dict)


class BertForNextSentencePrediction(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
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
    ) -> NextSentencePredictorOutput | tuple:
        check_no_attentions(output_attentions)
        encoded = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                   bool(output_hidden_states))
        out = NextSentencePredictorOutput(
            logits=self.cls.seq_relationship(encoded.pooled), hidden_states=encoded.padded_states()
        )
        if labels is not None:
            out.loss, _ = _next_sentence(out.logits, labels)
        return self._finish(out, return_dict)

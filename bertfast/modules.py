"""The BERT module tree, with transformers' submodule names so that checkpoints load unchanged.

Every module here works on packed tokens, ``(T, hidden)`` with the padding
removed, and calls ``bertfast.ops`` for everything but the dense matmuls. A
``Linear`` whose output goes straight into a fused op is applied without its bias
(``F.linear(x, weight)``) and the op adds the bias as part of its single pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bertfast import ops
from bertfast.config import BertConfig
from bertfast.padding import Packing


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(
        self, input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """Packed (T,) ids (or (T, hidden) ``inputs_embeds``) -> (T, hidden)."""
        return ops.embeddings(
            input_ids, position_ids, token_type_ids,
            self.word_embeddings.weight, self.position_embeddings.weight, self.token_type_embeddings.weight,
            self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, self.dropout_p, self.training,
            inputs_embeds=inputs_embeds, padding_idx=self.word_embeddings.padding_idx,
        )


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: Tensor, packing: Packing) -> Tensor:
        # One matmul for q, k and v; concatenating the weights copies 3 * hidden^2, far below the matmul.
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = F.linear(hidden, weight, bias).view(-1, 3, self.num_attention_heads, self.attention_head_size)
        context = ops.attention(qkv, packing.cu_seqlens, packing.max_seqlen, self.dropout_p, self.training)
        return context.reshape(hidden.shape)  # (T, hidden)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.hidden_dropout_prob

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        return ops.bias_dropout_add_layernorm(
            F.linear(hidden, self.dense.weight), self.dense.bias, residual,
            self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, self.dropout_p, self.training,
        )


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: Tensor, packing: Packing, rows: Tensor | None = None) -> Tensor:
        """With ``rows``, every token is a key but only those rows go on: the rest of the layer is per row."""
        context = self.self(hidden, packing)
        if rows is not None:
            context, hidden = context.index_select(0, rows), hidden.index_select(0, rows)
        return self.output(context, hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate = config.gelu_approximate

    def forward(self, hidden: Tensor) -> Tensor:
        return ops.bias_gelu(F.linear(hidden, self.dense.weight), self.dense.bias, self.approximate)


class BertOutput(BertSelfOutput):
    """The feed-forward block's down projection, dropout, residual and LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: Tensor, packing: Packing, rows: Tensor | None = None) -> Tensor:
        attended = self.attention(hidden, packing, rows)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(
        self, hidden: Tensor, packing: Packing, output_hidden_states: bool = False,
        last_layer_rows: Tensor | None = None,
    ) -> list[Tensor]:
        """Runs every layer on packed tokens; returns [last] or [embeddings, layer 1, ..., last].

        With ``last_layer_rows`` the last layer computes only those rows (its attention still reads
        every token as a key), like flash-attention's BERT does for the MLM loss.
        """
        states = [hidden]
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            rows = last_layer_rows if i == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, packing, rows, use_reentrant=False)
            else:
                hidden = layer(hidden, packing, rows)
            states.append(hidden)
        return states if output_hidden_states else [hidden]


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, first_token: Tensor) -> Tensor:
        return self.activation(self.dense(first_token))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = config.gelu_approximate

    def forward(self, hidden: Tensor) -> Tensor:
        return ops.bias_gelu_layernorm(
            F.linear(hidden, self.dense.weight), self.dense.bias,
            self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, self.approximate,
        )


class BertLMPredictionHead(nn.Module):
    """transform -> decoder. The decoder weight is tied to the word embeddings and its bias to ``bias``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden: Tensor) -> Tensor:
        """Full logits (rows, vocab): only used when the caller asks for logits."""
        return self.decoder(self.transform(hidden))

    def loss(self, hidden: Tensor, labels: Tensor, chunk_bytes: int | None = None) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy, number correct) over rows of ``hidden`` whose label is not -100.

        The (rows, vocab) logits are never all built at once: the fused op works in chunks.
        """
        return ops.linear_cross_entropy(
            self.transform(hidden), self.decoder.weight, self.bias, labels, chunk_bytes=chunk_bytes
        )


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertPreTrainingHeads(BertOnlyMLMHead):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

"""ALBERT (``AlbertModel`` and its heads) on packed tokens.

Factorised embeddings (``embedding_size``) mapped to ``hidden_size`` by
``encoder.embedding_hidden_mapping_in``; layer ``i`` of ``num_hidden_layers`` runs layer group
``int(i / (layers / groups))`` of ``encoder.albert_layer_groups``, each group its
``inner_group_num`` ``AlbertLayer``s in order. Shared layers run once per use with the same
parameters, so their gradients accumulate as transformers' do. A layer is attention
(query/key/value -> dense -> output_dropout -> LayerNorm + residual) -> ffn -> activation
(``gelu_new`` by default) -> ffn_output -> full_layer_layer_norm + residual (transformers applies
no dropout there).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bertfast.encoders import common
from bertfast.padding import Packing


def embed(base: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    return base.encoder.embedding_hidden_mapping_in(common.packed_embeddings(base.embeddings, packed, training))


def layers(base: nn.Module) -> list[nn.Module]:
    """Every ``AlbertLayer`` call in order: the shared modules appear once per use."""
    config, groups = base.config, base.encoder.albert_layer_groups
    per_group = config.num_hidden_layers / config.num_hidden_groups  # transformers' own float expression
    return [layer for i in range(config.num_hidden_layers) for layer in groups[int(i / per_group)].albert_layers]


def packed_layer(layer: nn.Module, hidden: Tensor, packing: Packing, rows: Tensor | None, training: bool) -> Tensor:
    """One ``AlbertLayer`` on packed tokens, (T, hidden) -> (T, hidden); with ``rows``, only those rows go on."""
    attention = layer.attention
    context = common.packed_attention(attention, (attention.query, attention.key, attention.value),
                                      attention.num_attention_heads, attention.attention_head_size,
                                      attention.attention_dropout.p, hidden, packing, training)
    context, hidden = common.keep_rows(rows, context, hidden)
    attended = common.add_norm(attention.dense, attention.LayerNorm, attention.output_dropout.p, context, hidden,
                               training)
    inner = common.feed_forward_in(layer.ffn, layer.activation, attended)
    return common.add_norm(layer.ffn_output, layer.full_layer_layer_norm, 0.0, inner, attended, training)


def packed_forward(base: nn.Module, arguments: dict[str, Any], embeddings_require_grad: bool = False) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    config = base.config
    limits = common.InputLimits(config.embedding_size, config.vocab_size, config.max_position_embeddings,
                                config.type_vocab_size)
    packing, states = common.encode(base, limits, arguments, embed, layers(base), embeddings_require_grad)
    last = common.last_hidden_state(packing, states, arguments)
    pooled = None if base.pooler is None else base.pooler_activation(base.pooler(last[:, 0]))
    hidden_states = common.selected_states(base, packing, states,
                                           common.option(arguments, config, "output_hidden_states", False))
    output = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)
    return common.finish(output, arguments, config)

"""DistilBERT (``DistilBertModel``) on packed tokens.

No token types and no pooler; positions are the table in ``embeddings.position_embeddings``, learned
or (``sinusoidal_pos_embds``) the fixed sinusoids transformers writes there, so reading the table is
exact either way. A block is attention -> out_lin -> sa_layer_norm(+ residual, no dropout) ->
ffn.lin1 -> activation (gelu or relu, from the config) -> ffn.lin2 -> dropout ->
output_layer_norm(+ residual).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bertfast import modules
from bertfast.encoders import common
from bertfast.padding import Packing


def embed(base: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    return common.packed_embeddings(base.embeddings, packed, training)


def layers(base: nn.Module) -> list[nn.Module]:
    return list(base.transformer.layer)


def packed_layer(layer: nn.Module, hidden: Tensor, packing: Packing, rows: Tensor | None, training: bool) -> Tensor:
    """One ``TransformerBlock`` on packed tokens, (T, dim) -> (T, dim); with ``rows``, only those rows go on."""
    attention, ffn = layer.attention, layer.ffn
    fused = modules.prepacked_layer(
        layer, hidden, packing, rows, training,
        ((attention.q_lin, attention.k_lin, attention.v_lin), (attention.out_lin,), (ffn.lin1,), (ffn.lin2,)),
        (layer.sa_layer_norm, layer.output_layer_norm), ffn.activation, attention.n_heads,
        attention.attention_head_size)
    if fused is not None:
        return fused
    context = common.packed_attention(attention, (attention.q_lin, attention.k_lin, attention.v_lin),
                                      attention.n_heads, attention.attention_head_size, attention.dropout.p,
                                      hidden, packing, training)
    context, hidden = common.keep_rows(rows, context, hidden)
    attended = common.add_norm(attention.out_lin, layer.sa_layer_norm, 0.0, context, hidden, training)
    inner = common.feed_forward_in(ffn.lin1, ffn.activation, attended)
    return common.add_norm(ffn.lin2, layer.output_layer_norm, ffn.dropout.p, inner, attended, training)


def packed_forward(base: nn.Module, arguments: dict[str, Any], embeddings_require_grad: bool = False) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    config = base.config
    limits = common.InputLimits(config.dim, config.vocab_size, config.max_position_embeddings)
    inputs = {k: v for k, v in arguments.items() if k != "token_type_ids"}  # DistilBERT has none
    packing, states = common.encode(base, limits, inputs, embed, layers(base), embeddings_require_grad)
    hidden_states = common.selected_states(base, packing, states,
                                           common.option(arguments, config, "output_hidden_states", False))
    last = common.last_hidden_state(packing, states, arguments)
    output = BaseModelOutput(last_hidden_state=last, hidden_states=hidden_states)
    return common.finish(output, arguments, config)

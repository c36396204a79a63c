"""MPNet (``MPNetModel`` and its heads; sentence-transformers' ``all-mpnet-base-v2``) on packed tokens.

Embeddings without token types, positions RoBERTa-style after ``padding_idx`` (1, whatever the
config says: ``MPNetEmbeddings`` fixes it); BERT-shaped layers with other names (``attention.attn.q``,
``k``, ``v``, ``o``; ``attention.LayerNorm``); one relative-position bias,
``encoder.relative_attention_bias``, added to every layer's scores. transformers buckets key - query
positions of the padded batch into 32 buckets (``compute_position_bias``'s default, whatever
``relative_attention_num_buckets`` is); inside a sequence without holes those are the packed
offsets' differences; with a mask with holes the attention counts the tokens' columns instead
(``common.hole_columns``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from bertfast import modules
from bertfast.common import relative_position
from bertfast.encoders import common
from bertfast.padding import Packing

NUM_BUCKETS = 32  # MPNetEncoder.compute_position_bias's, used whatever the config's table size
MAX_DISTANCE = 128  # MPNetEncoder.relative_position_bucket's


def unsupported(config: Any) -> str | None:
    if config.relative_attention_num_buckets < NUM_BUCKETS:
        return (f"relative_attention_num_buckets={config.relative_attention_num_buckets} "
                f"(transformers looks up {NUM_BUCKETS} buckets)")
    return None


@dataclass(frozen=True)
class BiasedPacking(Packing):
    """The packing the layers see: the layer module's call carries only the packing, so it holds the table
    (and the tokens' columns where the mask has holes)."""

    bias_table: Tensor | None = None
    columns: Tensor | None = None


def embed(base: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    return common.packed_embeddings(base.embeddings, packed, training)


def layers(base: nn.Module) -> list[nn.Module]:
    return list(base.encoder.layer)


def with_bias(base: nn.Module, packing: Packing) -> BiasedPacking:
    """``packing`` with the (32, heads) rows of ``relative_attention_bias`` that transformers' buckets reach."""
    table = base.encoder.relative_attention_bias.weight[:NUM_BUCKETS]
    return BiasedPacking(**{f.name: getattr(packing, f.name) for f in fields(packing)}, bias_table=table,
                         columns=common.hole_columns(packing))


def packed_layer(layer: nn.Module, hidden: Tensor, packing: BiasedPacking, rows: Tensor | None,
                 training: bool) -> Tensor:
    """One ``MPNetLayer`` on packed tokens, the relative-position bias from ``packing.bias_table``."""
    attention = layer.attention
    attn = attention.attn
    if packing.columns is None:  # a mask with holes: the layer runs op by op, the distances counted in columns
        fused = modules.prepacked_layer(
            layer, hidden, packing, rows, training,
            ((attn.q, attn.k, attn.v), (attn.o,), (layer.intermediate.dense,), (layer.output.dense,)),
            (attention.LayerNorm, layer.output.LayerNorm), layer.intermediate.intermediate_act_fn,
            attn.num_attention_heads, attn.attention_head_size,
            attention=lambda: {"attention_bias": relative_position.distance_bias(
                packing.bias_table, packing.max_seqlen, NUM_BUCKETS, MAX_DISTANCE).to(torch.float32).contiguous()})
        if fused is not None:
            return fused
    context = common.packed_attention(attn, (attn.q, attn.k, attn.v), attn.num_attention_heads,
                                      attn.attention_head_size, attn.dropout.p, hidden, packing, training,
                                      bias_table=packing.bias_table, num_buckets=NUM_BUCKETS,
                                      max_distance=MAX_DISTANCE, columns=packing.columns)
    context, hidden = common.keep_rows(rows, context, hidden)
    attended = common.add_norm(attn.o, attention.LayerNorm, attention.dropout.p, context, hidden, training)
    return modules.packed_add_norm(layer.output, modules.packed_intermediate(layer.intermediate, attended),
                                   attended, training)


def packed_forward(base: nn.Module, arguments: dict[str, Any], embeddings_require_grad: bool = False) -> Any:
    """``arguments["position_ids"]``: the RoBERTa-style positions (the drop-in computes them)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    config = base.config
    limits = common.InputLimits(config.hidden_size, config.vocab_size, config.max_position_embeddings)
    inputs = {k: v for k, v in arguments.items() if k != "token_type_ids"}  # MPNet has none
    packing, states = common.encode(base, limits, inputs, embed, layers(base), embeddings_require_grad,
                                    packing_of=lambda p, _: with_bias(base, p))
    last = common.last_hidden_state(packing, states, arguments)
    requested = common.option(arguments, config, "output_hidden_states", False, none_is_unset=True)
    hidden_states = common.selected_states(base, packing, states, requested, by_index=False)
    output = BaseModelOutputWithPooling(last_hidden_state=last,
                                        pooler_output=None if base.pooler is None else base.pooler(last),
                                        hidden_states=hidden_states)
    return common.finish(output, arguments, config, none_is_unset=True)

"""DeBERTa-v2 and -v3 (``DebertaV2Model`` and its heads) on packed tokens, with disentangled attention.

Embeddings: words, plus learned positions where ``position_biased_input`` (v3 has none), plus token types where
``type_vocab_size`` > 0, then ``embed_proj`` when ``embedding_size`` differs, then LayerNorm (the padding mask
transformers multiplies in is 1 on every packed token). Each layer is BERT-shaped (``attention.self.query_proj``,
``key_proj``, ``value_proj``; ``attention.output``; ``intermediate``; ``output``) and its attention adds DeBERTa's
content-to-position and position-to-content terms: the relative-position embeddings (``encoder.rel_embeddings``,
LayerNorm'd once per call when ``norm_rel_ebd`` says so, dropped out per layer as transformers does) projected by
the layer's ``pos_key_proj`` / ``pos_query_proj`` (or its key and query projections, ``share_att_key``), read by
``bertfast.ops.attention`` at each (query, key) pair's bucketed distance, never as a (L, L) tensor. Only the rows
of the table that the batch's distances reach are projected. Distances count padded columns, as transformers
counts them, where a mask has holes.

Refused by name: the convolution layer of DeBERTa-v2-xlarge (``conv_kernel_size``). ``pos_att_type`` entries other
than c2p and p2c are ignored, as transformers ignores them. Calls transformers' forward would treat differently
fall back (``fallback``): a base model with ``z_steps`` > 1.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertfast import modules
from bertfast.common import relative_position
from bertfast.encoders import common
from bertfast.padding import Packing

TERMS = ("c2p", "p2c")


def unsupported(config: Any) -> str | None:
    if getattr(config, "conv_kernel_size", 0) > 0:
        return f"conv_kernel_size={config.conv_kernel_size} (DeBERTa-v2's convolution layer)"
    return None


def fallback(model: nn.Module, arguments: dict[str, Any]) -> str | None:
    """transformers' forward reruns the last layer ``z_steps`` times (enhanced mask decoding); bertfast does not.
    Attention probabilities are never materialised, and DeBERTa's heads pass ``output_attentions=None`` down
    meaning the config's, which the drop-in's general check reads as not asked."""
    if getattr(model, "z_steps", 0) > 1:
        return f"z_steps={model.z_steps}"
    if common.option(arguments, model.config, "output_attentions", False, none_is_unset=True):
        return "output_attentions=True (the fused attention never materialises the probabilities)"
    return None


@dataclass(frozen=True)
class RelativePacking(Packing):
    """The packing the layers see: the relative-position rows the batch reaches, (rows, hidden), their row for each
    key - query distance, (2 * max_seqlen - 1,), and the tokens' columns where the mask has holes."""

    rel_embeddings: Tensor | None = None
    pos_index: Tensor | None = None
    columns: Tensor | None = None


def embed(base: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    embeddings = base.embeddings
    x = packed["inputs_embeds"]
    if x is None:
        x = embeddings.word_embeddings(packed["input_ids"])
    if embeddings.position_embeddings is not None and embeddings.position_biased_input:
        x = x + embeddings.position_embeddings(packed["position_ids"])
    if embeddings.token_type_embeddings is not None:
        x = x + embeddings.token_type_embeddings(packed["token_type_ids"])
    if embeddings.embed_proj is not None:
        x = embeddings.embed_proj(x)
    return F.dropout(embeddings.LayerNorm(x), embeddings.dropout.p, training)


def layers(base: nn.Module) -> list[nn.Module]:
    return list(base.encoder.layer)


def with_relative_positions(base: nn.Module, packing: Packing) -> RelativePacking:
    """``packing`` with the rows of the relative-position table its distances reach and the index into them."""
    encoder = base.encoder
    extra: dict[str, Tensor | None] = {"columns": common.hole_columns(packing)}
    if encoder.relative_attention:
        table = encoder.get_rel_embedding()  # (2 * span, hidden), LayerNorm'd where the config says so
        span = table.shape[0] // 2
        index = relative_position.deberta_position_index(packing.max_seqlen, encoder.position_buckets,
                                                         encoder.max_relative_positions, span)
        if not torch.compiler.is_compiling():  # eager: project only the rows the distances reach
            lo, hi = int(index.min()), int(index.max())
            table, index = table[lo:hi + 1], index - lo
        extra.update(rel_embeddings=table, pos_index=index.to(table.device))
    return RelativePacking(**{f.name: getattr(packing, f.name) for f in fields(packing)}, **extra)


def _position_tables(attention: nn.Module, rel: Tensor, training: bool) -> tuple[Tensor | None, Tensor | None]:
    """The layer's (rows, heads, head_dim) key and query projections of the relative-position rows."""
    rel = attention.pos_dropout(rel) if training else rel
    heads, head_dim = attention.num_attention_heads, attention.attention_head_size
    terms = attention.pos_att_type
    key = attention.key_proj if attention.share_att_key else getattr(attention, "pos_key_proj", None)
    query = attention.query_proj if attention.share_att_key else getattr(attention, "pos_query_proj", None)
    pos_key = key(rel).view(-1, heads, head_dim) if "c2p" in terms else None
    pos_query = query(rel).view(-1, heads, head_dim) if "p2c" in terms else None
    return pos_key, pos_query


def _float_tables(relative: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    """The position tables as the native layer call reads them (float32, contiguous)."""
    return {k: v if v is None or k == "pos_index" else v.to(torch.float32).contiguous() for k, v in relative.items()}


def packed_layer(layer: nn.Module, hidden: Tensor, packing: RelativePacking, rows: Tensor | None,
                 training: bool) -> Tensor:
    """One ``DebertaV2Layer`` on packed tokens, (T, hidden) -> (T, hidden); with ``rows``, only those rows go on."""
    attention = layer.attention.self
    head_dim = attention.attention_head_size
    # transformers divides every term by sqrt(head_dim * (1 + the position terms the config names)).
    scale = 1.0 / (head_dim * (1 + sum(t in attention.pos_att_type for t in TERMS))) ** 0.5

    def relative() -> dict[str, Tensor | None]:
        if not attention.relative_attention or packing.pos_index is None:
            return {}
        pos_key, pos_query = _position_tables(attention, packing.rel_embeddings, training)
        if pos_key is None and pos_query is None:
            return {}
        return {"pos_key": pos_key, "pos_query": pos_query, "pos_index": packing.pos_index}

    out = layer.attention.output
    # With a mask with holes the layer runs op by op (the attention counts the tokens' columns).
    fused = None if packing.columns is not None else modules.prepacked_layer(
        layer, hidden, packing, rows, training,
        ((attention.query_proj, attention.key_proj, attention.value_proj), (out.dense,), (layer.intermediate.dense,),
         (layer.output.dense,)),
        (out.LayerNorm, layer.output.LayerNorm), layer.intermediate.intermediate_act_fn, attention.num_attention_heads,
        head_dim, scale, lambda: _float_tables(relative()))
    if fused is not None:
        return fused
    context = common.packed_attention(
        attention, (attention.query_proj, attention.key_proj, attention.value_proj), attention.num_attention_heads,
        head_dim, attention.dropout.p, hidden, packing, training, softmax_scale=scale, columns=packing.columns,
        **relative())
    context, hidden = common.keep_rows(rows, context, hidden)
    attended = common.add_norm(out.dense, out.LayerNorm, out.dropout.p, context, hidden, training)
    inner = common.feed_forward_in(layer.intermediate.dense, layer.intermediate.intermediate_act_fn, attended)
    return common.add_norm(layer.output.dense, layer.output.LayerNorm, layer.output.dropout.p, inner, attended,
                           training)


def packed_forward(base: nn.Module, arguments: dict[str, Any], embeddings_require_grad: bool = False) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    config = base.config
    embedding_size = getattr(config, "embedding_size", None) or config.hidden_size
    positions = config.max_position_embeddings if base.embeddings.position_embeddings is not None else None
    limits = common.InputLimits(embedding_size, config.vocab_size, positions, max(config.type_vocab_size, 1))
    if base.embeddings.token_type_embeddings is None:  # transformers ignores the token types it has no table for
        arguments = {k: v for k, v in arguments.items() if k != "token_type_ids"}
    packing, states = common.encode(base, limits, arguments, embed, layers(base), embeddings_require_grad,
                                    packing_of=lambda p, _: with_relative_positions(base, p))
    last = common.last_hidden_state(packing, states, arguments)
    # DeBERTa's forwards read a None option as the config's (its heads pass None down).
    requested = common.option(arguments, config, "output_hidden_states", False, none_is_unset=True)
    hidden_states = tuple(packing.unpack(s) for s in states) if requested else None
    output = BaseModelOutput(last_hidden_state=last, hidden_states=hidden_states)
    return common.finish(output, arguments, config, none_is_unset=True)

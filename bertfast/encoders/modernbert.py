"""ModernBERT (``ModernBertModel`` and its heads; gte-modernbert, modernbert-embed) on packed tokens.

transformers runs ModernBERT unpadded only with flash-attn; its SDPA / eager path computes every pad.
Here the tokens are packed: embeddings ``norm(tok_embeddings)`` (a bias-free LayerNorm); pre-norm layers
``h + attn(attn_norm(h))`` then ``h + Wo(geglu(Wi(mlp_norm(h))))`` (layer 0's ``attn_norm`` is an
Identity); rotary position embeddings on q and k (``ops.rotary``, the global or local theta of the
layer type); sliding-window attention on the ``sliding_attention`` layers (``ops.attention``'s
``window``: |query - key| <= ``local_attention // 2``, transformers' inclusive bound); ``final_norm``.

Positions are the padded row's column index (transformers' default ``arange(seq_len)``) or the call's
``position_ids``; the window counts the padded distance, as transformers does: tokens of the packed
sequence where each row's real tokens are one run, the tokens' columns where the mask has holes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from bertfast import modules, ops
from bertfast.encoders import common
from bertfast.padding import Packing


def unsupported(config: Any) -> str | None:
    for layer_type, params in (config.rope_parameters or {}).items():
        if params is not None and params.get("rope_type", "default") != "default":
            return f"rope_type={params['rope_type']!r} for {layer_type} (bertfast runs the default rotary embedding)"
    return None


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    """A LayerNorm (bias-free where ``norm_bias=False``) on packed (T, H); an Identity or other module as called."""
    if type(norm) is nn.LayerNorm:
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(x)


def embed(base: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    embeddings = base.embeddings
    inputs_embeds = packed["inputs_embeds"]
    x = embeddings.tok_embeddings(packed["input_ids"]) if inputs_embeds is None else inputs_embeds
    return F.dropout(_norm(embeddings.norm, x), embeddings.drop.p, training)


def _inv_freq(base: nn.Module, layer_type: str) -> Tensor:
    rotary = base.rotary_emb
    scaling = getattr(rotary, f"{layer_type}_attention_scaling")
    if scaling != 1.0:
        raise ValueError(f"rotary attention_scaling={scaling} is not supported")
    return getattr(rotary, f"{layer_type}_inv_freq")


def attention(attn: nn.Module, hidden: Tensor, packing: Packing, positions: Tensor, inv_freq: Tensor,
              training: bool) -> Tensor:
    """``ModernBertAttention`` on packed tokens: Wqkv, rotary on q and k, (windowed) attention, Wo."""
    heads, head_dim = attn.config.num_attention_heads, attn.head_dim
    qkv = attn.Wqkv(hidden).view(-1, 3, heads, head_dim)
    qkv = ops.rotary(qkv, positions, inv_freq)
    # transformers' sliding_window is the inclusive half-window plus one (flash-attn's convention)
    window = None if attn.sliding_window is None else attn.sliding_window - 1
    dropout_p = attn.attention_dropout if training else 0.0
    context = ops.attention(qkv, packing.cu_seqlens, packing.max_seqlen, dropout_p, training,
                            head_dim ** -0.5, window=window, columns=packing.columns if window is not None else None)
    return attn.out_drop(attn.Wo(context.reshape(qkv.shape[0], heads * head_dim)))


def mlp(block: nn.Module, x: Tensor) -> Tensor:
    """``ModernBertMLP``: Wo(drop(act(input) * gate)) with (input, gate) = Wi(x), the gating one fused op."""
    y = block.Wi(x)
    form = modules.gelu_form(block.act)
    if form is None:
        value, gate = y.chunk(2, dim=-1)
        gated = block.act(value) * gate
    else:
        gated = ops.geglu(y, form)
    return block.Wo(block.drop(gated))


@dataclass(frozen=True)
class RotaryPacking(Packing):
    """The packing the layers see: the layer module's call carries only the packing, so it holds each
    token's position and the rotary frequencies of each layer type."""

    positions: Tensor | None = None
    inv_freq: dict[str, Tensor] = field(default_factory=dict)
    columns: Tensor | None = None  # where the mask has holes: each token's column (``common.hole_columns``)


def with_rotary(base: nn.Module, packing: Packing, positions: Tensor) -> RotaryPacking:
    inv_freq = {layer_type: _inv_freq(base, layer_type) for layer_type in set(base.config.layer_types)}
    return RotaryPacking(**{f.name: getattr(packing, f.name) for f in fields(Packing)}, positions=positions,
                         inv_freq=inv_freq, columns=common.hole_columns(packing))


def packed_layer(layer: nn.Module, hidden: Tensor, packing: RotaryPacking, rows: Tensor | None,
                 training: bool) -> Tensor:
    """One ``ModernBertEncoderLayer`` on packed tokens, rotary positions and frequencies from ``packing``."""
    attended = attention(layer.attn, _norm(layer.attn_norm, hidden), packing, packing.positions,
                         packing.inv_freq[layer.attention_type], training)
    attended, hidden = common.keep_rows(rows, attended, hidden)
    hidden = hidden + attended
    return hidden + mlp(layer.mlp, _norm(layer.mlp_norm, hidden))


def packed_forward(base: nn.Module, arguments: dict[str, Any], embeddings_require_grad: bool = False) -> Any:
    from transformers.modeling_outputs import BaseModelOutput

    config = base.config
    # Rotary positions index no table: like transformers, inputs longer than max_position_embeddings run.
    limits = common.InputLimits(config.hidden_size, config.vocab_size, None)
    # No token types; without position_ids pack_inputs counts the padded row's columns (transformers' arange)
    inputs = {k: v for k, v in arguments.items() if k != "token_type_ids"}
    packing, states = common.encode(base, limits, inputs, embed, list(base.layers), embeddings_require_grad,
                                    packing_of=lambda p, packed: with_rotary(base, p, packed["position_ids"]))
    states[-1] = _norm(base.final_norm, states[-1])  # transformers hands out the final norm's output last
    last = common.last_hidden_state(packing, states, arguments)
    requested = common.option(arguments, config, "output_hidden_states", False, none_is_unset=True)
    hidden_states = common.selected_states(base, packing, states, requested)
    output = BaseModelOutput(last_hidden_state=last, hidden_states=hidden_states)
    return common.finish(output, arguments, config, none_is_unset=True)

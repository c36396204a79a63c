"""The pieces every family's packed encoder is made of, parameterised by the family's submodules.

They are ``bertfast.modules``' BERT functions with the modules passed in instead of read by BERT's
names: a plain ``nn.Linear`` feeding a fused op is applied without its bias (the op adds it), any
other module in that place (a LoRA layer, a quantized Linear) runs as a module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertfast import modules, ops, sentence_embeddings
from bertfast.models.base import pack_inputs
from bertfast.modules import PACKING_KEY, ROWS_KEY
from bertfast.padding import Packing


@dataclass(frozen=True)
class InputLimits:
    """What a family's inputs are checked against (``pack_inputs`` reads these names)."""

    hidden_size: int  # the width of inputs_embeds: the embedding size where it differs from the hidden size
    vocab_size: int
    max_position_embeddings: int | None  # None: no position table (rotary positions), any length runs
    type_vocab_size: int = 1


def pack(base: nn.Module, limits: InputLimits, arguments: dict[str, Any]) -> tuple[Packing, dict[str, Tensor | None]]:
    """The call's inputs checked (naming whatever is wrong) and packed to (T,) / (T, width) tensors."""
    weight = base.get_input_embeddings().weight
    names = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")
    for name in names:
        tensor = arguments.get(name)
        if tensor is not None and tensor.device != weight.device:
            raise ValueError(f"{name} is on {tensor.device} but the model is on {weight.device}; "
                             f"move the inputs with .to({str(weight.device)!r})")
    return pack_inputs(limits, arguments.get("input_ids"), arguments.get("attention_mask"),
                       arguments.get("token_type_ids"), arguments.get("position_ids"), arguments.get("inputs_embeds"))


def packed_embeddings(embeddings: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    """dropout(LayerNorm(word + position [+ token type])) of packed inputs, (T, width).

    A family without token types (no ``token_type_embeddings``) runs the same fused op with a zero
    type row, which adds exactly nothing.
    """
    if hasattr(embeddings, "token_type_embeddings"):
        return modules.packed_embeddings(embeddings, packed["input_ids"], packed["position_ids"],
                                         packed["token_type_ids"], packed["inputs_embeds"], training)
    input_ids, inputs_embeds, position_ids = packed["input_ids"], packed["inputs_embeds"], packed["position_ids"]
    words, positions, norm = embeddings.word_embeddings, embeddings.position_embeddings, embeddings.LayerNorm
    if inputs_embeds is None and type(words) is not nn.Embedding:  # a wrapped embedding: use what it returns
        inputs_embeds, input_ids = words(input_ids), None
    p = embeddings.dropout.p
    if not _plain_layernorm(norm):
        x = (words(input_ids) if inputs_embeds is None else inputs_embeds) + positions(position_ids)
        return F.dropout(norm(x), p, training)
    no_types = positions.weight.new_zeros(1, positions.weight.shape[1])
    return ops.embeddings(
        input_ids, position_ids, torch.zeros_like(position_ids), words.weight, positions.weight, no_types,
        norm.weight, norm.bias, norm.eps, p, training, inputs_embeds=inputs_embeds, padding_idx=words.padding_idx,
    )


def _plain_layernorm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None


def packed_attention(
    owner: nn.Module, linears: tuple[nn.Module, nn.Module, nn.Module], heads: int, head_dim: int,
    dropout_p: float, hidden: Tensor, packing: Packing, training: bool, **bias: Any,
) -> Tensor:
    """Self-attention of packed tokens through ``linears`` (q, k, v), (T, hidden) -> (T, heads * head_dim).

    ``owner`` holds the inference cache of the concatenated weights; ``bias`` goes to ``ops.attention``
    (MPNet's relative-position bias and the columns of a mask with holes).
    """
    if all(type(lin) is nn.Linear and lin.bias is not None for lin in linears):
        weight, qkv_bias = modules._fused_qkv_weights(owner, training, linears)
        qkv = F.linear(hidden, weight, qkv_bias)
    else:  # some projection is not a plain Linear: each one runs as its module
        qkv = torch.stack([lin(hidden) for lin in linears], dim=1)
    qkv = qkv.view(-1, 3, heads, head_dim)
    context = ops.attention(qkv, packing.cu_seqlens, packing.max_seqlen, dropout_p, training, **bias)
    return context.reshape(qkv.shape[0], heads * head_dim)


def add_norm(dense: nn.Module, norm: nn.Module, dropout_p: float, x: Tensor, residual: Tensor,
             training: bool) -> Tensor:
    """norm(dropout(dense(x)) + residual), fused when ``norm`` is a plain LayerNorm."""
    y, bias = modules.linear_parts(dense, x)
    if _plain_layernorm(norm):
        return ops.bias_dropout_add_layernorm(y, bias, residual, norm.weight, norm.bias, norm.eps, dropout_p,
                                              training)
    if bias is not None:
        y = y + bias
    return norm(F.dropout(y, dropout_p, training) + residual)


def feed_forward_in(dense: nn.Module, activation: nn.Module, x: Tensor) -> Tensor:
    """activation(dense(x)): fused bias + GELU, or the activation module itself (ReLU, ...)."""
    y, bias = modules.linear_parts(dense, x)
    form = modules.gelu_form(activation)
    if form is None:
        return activation(y if bias is None else y + bias)
    return ops.bias_gelu(y, bias, form)


def run_layers(layers: Sequence[nn.Module], hidden: Tensor, packing: Packing) -> list[Tensor]:
    """[input, after layer 1, ..., after the last]: each layer called as a module on packed tokens.

    The drop-in's class-level wrapper runs the family's packed layer for that call (``PACKING_KEY``),
    under transformers' ``GradientCheckpointingLayer`` where the layer class is one, so activation
    checkpointing is transformers' own.
    """
    states = [hidden]
    for layer in layers:
        hidden = layer(hidden, **{PACKING_KEY: packing, ROWS_KEY: None})
        states.append(hidden)
    return states


def encode(base: nn.Module, limits: InputLimits, arguments: dict[str, Any],
           embed: Callable[[nn.Module, dict[str, Tensor | None], bool], Tensor], layers: Sequence[nn.Module],
           embeddings_require_grad: bool,
           packing_of: Callable[[Packing, dict[str, Tensor | None]], Packing] = lambda p, _: p,
           ) -> tuple[Packing, list[Tensor]]:
    """Pack the call's inputs, embed them and run ``layers``: (packing, every hidden state, packed).

    ``embeddings_require_grad`` marks the embeddings' output as requiring grad, as transformers'
    ``enable_input_require_grads`` hook does (reentrant checkpointing of frozen embeddings then still
    reaches the layers' parameters). ``packing_of(packing, packed inputs)`` gives the packing the
    layers see (MPNet's carries its bias table, ModernBERT's the rotary positions).
    """
    packing, packed = pack(base, limits, arguments)
    hidden = embed(base, packed, base.training)
    if embeddings_require_grad and torch.is_grad_enabled():
        hidden.requires_grad_(True)
    return packing, run_layers(layers, hidden, packing_of(packing, packed))


def hole_columns(packing: Packing) -> Tensor | None:
    """Each packed token's column in its padded row where some row's tokens are not one run (an attention
    mask with holes), else None: relative distances (a position bias, a window) are then counted in columns,
    as transformers counts them, not in packed tokens. Under torch.compile the mask's values are unknown, so
    the columns always come (the same answer, on the kernels' general path)."""
    if packing.indices is None:
        return None
    columns = packing.indices % packing.seqlen
    if torch.compiler.is_compiling():
        return columns
    starts, ends = packing.cu_seqlens[:-1].long(), packing.cu_seqlens[1:].long()
    filled = packing.lengths > 0
    first = columns[starts[filled]]
    last = columns[ends[filled] - 1]
    one_run = (last - first + 1) == packing.lengths[filled]
    return None if bool(one_run.all()) else columns


def last_hidden_state(packing: Packing, states: list[Tensor], arguments: dict[str, Any]) -> Tensor:
    """The last layer's output padded as transformers returns it, carrying the packed rows it came from.

    sentence-transformers' Pooling / Normalize then read those rows with the fused pooling op
    (``bertfast.sentence_embeddings``), as they do for the BERT path.
    """
    last = packing.unpack(states[-1])
    sentence_embeddings.attach(last, states[-1], packing, arguments.get("attention_mask"))
    return last


def keep_rows(rows: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The given packed rows of each tensor (all of them when ``rows`` is None)."""
    return tensors if rows is None else tuple(t.index_select(0, rows) for t in tensors)


def selected_states(base: nn.Module, packing: Packing, states: list[Tensor], output_hidden_states: Any,
                    by_index: bool = True) -> tuple[Tensor | None, ...] | None:
    """The padded hidden states the call asks for, as transformers returns them.

    ``output_hidden_states`` is a flag, or (``by_index``: models whose forward records its outputs
    with transformers' hooks) an index or indices, resolved by transformers' own rule (modulo
    ``num_hidden_layers + 1``, even where a layer group runs more layers): the others are then None.
    """
    if not output_hidden_states:
        return None
    if isinstance(output_hidden_states, bool) or not by_index:
        return tuple(packing.unpack(s) for s in states)
    from transformers.utils.output_capturing import resolve_hidden_states_indices, selected_hidden_states

    chosen = resolve_hidden_states_indices(base, selected_hidden_states(output_hidden_states))
    return tuple(packing.unpack(s) if i in chosen else None for i, s in enumerate(states))


def option(arguments: dict[str, Any], config: Any, name: str, default: Any, none_is_unset: bool = False) -> Any:
    """An output option as the model's forward reads it: the call's value when passed, else the config's.

    ``none_is_unset``: a passed None also means the config's (forwards that test ``is not None``);
    otherwise a passed None counts as passed, as transformers 5's output recorder reads it.
    """
    value = arguments.get(name, _MISSING)
    if value is _MISSING or (value is None and none_is_unset):
        return getattr(config, name, default)
    return value


_MISSING = object()


def finish(output: Any, arguments: dict[str, Any], config: Any, none_is_unset: bool = False) -> Any:
    """``output`` as the call asked: the ModelOutput, or its tuple when ``return_dict`` is False."""
    return output.to_tuple() if option(arguments, config, "return_dict", True, none_is_unset) is False else output

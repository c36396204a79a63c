"""ELECTRA (``ElectraModel``: discriminator, generator and task heads) on packed tokens.

BERT's embeddings and layers, at ``embedding_size`` for the embeddings, then ``embeddings_project``
(a Linear to ``hidden_size``) when the two sizes differ; no pooler.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bertfast import modules
from bertfast.encoders import common
from bertfast.padding import Packing


def embed(base: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    hidden = common.packed_embeddings(base.embeddings, packed, training)
    project = getattr(base, "embeddings_project", None)
    return hidden if project is None else project(hidden)


def layers(base: nn.Module) -> list[nn.Module]:
    return list(base.encoder.layer)


def bert_layer(layer: nn.Module, hidden: Tensor, packing: Packing, training: bool) -> Tensor:
    """One ``ElectraLayer`` (BERT's layer, BERT's names) on packed tokens."""
    return modules.packed_layer(layer, hidden, packing, None, training)


def layer_step(base: nn.Module) -> common.LayerStep:
    return bert_layer


def packed_forward(base: nn.Module, arguments: dict[str, Any]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    config = base.config
    limits = common.InputLimits(config.embedding_size, config.vocab_size, config.max_position_embeddings,
                                config.type_vocab_size)
    packing, packed = common.pack(base, limits, arguments)
    states = common.run_layers(layers(base), bert_layer, embed(base, packed, base.training), packing,
                               base.training)
    hidden_states = common.selected_states(
        base, packing, states, common.flag(arguments, config, "output_hidden_states", False))
    output = BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=packing.unpack(states[-1]),
                                                       hidden_states=hidden_states)
    return common.finish(output, arguments, config)

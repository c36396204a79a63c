"""ELECTRA (``ElectraModel``: discriminator, generator and task heads) on packed tokens.

BERT's embeddings and layers (``bertfast.modules.packed_layer`` runs an ``ElectraLayer``), at
``embedding_size`` for the embeddings, then ``embeddings_project`` (a Linear to ``hidden_size``)
when the two sizes differ; no pooler.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bertfast.encoders import common


def embed(base: nn.Module, packed: dict[str, Tensor | None], training: bool) -> Tensor:
    hidden = common.packed_embeddings(base.embeddings, packed, training)
    project = getattr(base, "embeddings_project", None)
    return hidden if project is None else project(hidden)


def layers(base: nn.Module) -> list[nn.Module]:
    return list(base.encoder.layer)


def packed_forward(base: nn.Module, arguments: dict[str, Any], embeddings_require_grad: bool = False) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    config = base.config
    limits = common.InputLimits(config.embedding_size, config.vocab_size, config.max_position_embeddings,
                                config.type_vocab_size)
    packing, states = common.encode(base, limits, arguments, embed, layers(base), embeddings_require_grad)
    hidden_states = common.selected_states(base, packing, states,
                                           common.option(arguments, config, "output_hidden_states", False))
    last = common.last_hidden_state(packing, states, arguments)
    output = BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=last, hidden_states=hidden_states)
    return common.finish(output, arguments, config)

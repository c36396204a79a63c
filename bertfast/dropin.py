"""The drop-in: transformers' BERT-family models run on bertfast's packed, fused encoder.

``accelerate(model)`` rebinds the ``forward`` of every supported base model inside ``model`` (a
``BertModel``, ``RobertaModel``, ... on its own, under a task head, in a PEFT or
sentence-transformers wrapper, or in a user's module) to bertfast's encoder, reading the same
submodules. Nothing else changes: the parameters are the same objects, the state dict, the class
and the heads are transformers' own. ``patch_transformers()`` does the same at the class level, so
every model of those classes runs accelerated, whoever builds it.

A call that the packed path cannot honour runs transformers' own forward instead (see
``fallback_reason``), so the answer is always transformers' answer. One difference is by design:
the encoder's outputs at padded positions are zeros (bertfast never computes padding), where
transformers returns the values its attention happens to give those positions.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bertfast.models.base import encode


@dataclass(frozen=True)
class Family:
    """A transformers model family whose base model bertfast runs: where its class lives, and its positions."""

    module: str
    base_class: str
    positions_after_padding: bool  # RoBERTa-style: position ids start at padding_idx + 1 and skip padding
    encoder: str | None = None  # a bertfast.encoders module, for a module tree that is not BERT's


# model_type -> family. One registry for accelerate() and patch_transformers().
FAMILIES: dict[str, Family] = {
    "bert": Family("transformers.models.bert.modeling_bert", "BertModel", False),
    "roberta": Family("transformers.models.roberta.modeling_roberta", "RobertaModel", True),
    "xlm-roberta": Family("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRobertaModel", True),
    "camembert": Family("transformers.models.camembert.modeling_camembert", "CamembertModel", True),
    "distilbert": Family("transformers.models.distilbert.modeling_distilbert", "DistilBertModel", False,
                         "bertfast.encoders.distilbert"),
    "electra": Family("transformers.models.electra.modeling_electra", "ElectraModel", False,
                      "bertfast.encoders.electra"),
    "albert": Family("transformers.models.albert.modeling_albert", "AlbertModel", False, "bertfast.encoders.albert"),
    "mpnet": Family("transformers.models.mpnet.modeling_mpnet", "MPNetModel", True, "bertfast.encoders.mpnet"),
    "modernbert": Family("transformers.models.modernbert.modeling_modernbert", "ModernBertModel", False,
                         "bertfast.encoders.modernbert"),
}

# Arguments the packed path understands; any other keyword sends the call to transformers' forward.
_HANDLED = {"self", "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
            "output_hidden_states", "output_attentions", "return_dict", "head_mask", "encoder_hidden_states",
            "encoder_attention_mask", "cache", "past_key_values", "use_cache", "kwargs",
            # transformers' loss and mixture-of-experts kwargs, which heads pass down and an encoder ignores
            # (Trainer passes num_items_in_batch on every step)
            "num_items_in_batch", "output_router_logits",
            # padding-free batches (DataCollatorWithFlattening) and causal masks: fall back when set
            "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "is_causal"}

_ORIGINAL_FORWARD: dict[type, Callable] = {}  # classes patched by patch_transformers()


@functools.cache
def _family_classes() -> dict[type, Family]:
    classes = {}
    for family in FAMILIES.values():
        try:
            module = importlib.import_module(family.module)
        except ImportError:
            continue
        classes[getattr(module, family.base_class)] = family
    return classes


def _family_of(module: nn.Module) -> Family | None:
    for cls in type(module).__mro__:
        family = _family_classes().get(cls)
        if family is not None:
            return family
    return None


def _unsupported_config(config: Any) -> str | None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "is_decoder / add_cross_attention (causal or cross-attention)"
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        return f"position_embedding_type={position_type!r}"
    check = _encoder_check(FAMILIES.get(getattr(config, "model_type", None)), "unsupported")
    return None if check is None else check(config)


def _encoder_check(family: Family | None, name: str) -> Callable | None:
    """A family encoder's own ``unsupported`` / ``fallback`` check, where it has one."""
    if family is None or family.encoder is None:
        return None
    return getattr(importlib.import_module(family.encoder), name, None)


def _flatten(arguments: dict[str, Any]) -> dict[str, Any]:
    """A bound call's arguments with its ``**kwargs`` merged in (unchanged when there are none)."""
    if "kwargs" not in arguments:
        return arguments
    extra = arguments["kwargs"] or {}
    return {**{k: v for k, v in arguments.items() if k != "kwargs"}, **extra}


def fallback_reason(model: nn.Module, arguments: dict[str, Any]) -> str | None:
    """Why this call must run transformers' own forward, or None when the packed path computes it.

    ``arguments`` are the call's, by name (``**kwargs`` as a ``"kwargs"`` entry or merged in).
    """
    config = model.config
    merged = _flatten(arguments)
    unknown = sorted(set(merged) - _HANDLED)
    if unknown:
        return f"arguments {unknown}"
    if merged.get("output_attentions", getattr(config, "output_attentions", False)):
        return "output_attentions=True (the fused attention never materialises the probabilities)"
    if merged.get("head_mask") is not None:
        return "head_mask"
    mask = merged.get("attention_mask")
    if isinstance(mask, dict):
        return "a precomputed attention mask mapping"
    if mask is not None and mask.dim() != 2:
        return f"a {mask.dim()}-D attention_mask"
    for name in ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "cu_seq_lens_q",
                 "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):
        if merged.get(name) is not None:
            return name
    if merged.get("is_causal"):
        return "is_causal=True"
    if merged.get("use_cache"):
        return "use_cache=True"
    reason = _unsupported_config(config)
    if reason is not None:
        return reason
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return "tracing or ONNX export"
    check = _encoder_check(_family_of(model), "fallback")
    return None if check is None else check(merged)


def _roberta_positions(model: nn.Module, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
    """transformers' RoBERTa position ids: real tokens count from padding_idx + 1, padding stays padding_idx."""
    padding_idx = model.embeddings.padding_idx
    if input_ids is not None:
        real = input_ids.ne(padding_idx).int()
        return (torch.cumsum(real, dim=1).int() * real).long() + padding_idx
    seqlen = inputs_embeds.shape[1]
    return torch.arange(padding_idx + 1, seqlen + padding_idx + 1, device=inputs_embeds.device)[None]


def _packed_forward(model: nn.Module, family: Family, merged: dict[str, Any]) -> Any:
    """The base model's forward on bertfast's encoder; ``merged``: the call's arguments by name."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    config = model.config
    input_ids, inputs_embeds = merged.get("input_ids"), merged.get("inputs_embeds")
    position_ids = merged.get("position_ids")
    if position_ids is None and family.positions_after_padding:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        position_ids = _roberta_positions(model, input_ids, inputs_embeds)
    if family.encoder is not None:
        return importlib.import_module(family.encoder).packed_forward(model, {**merged, "position_ids": position_ids})
    output_hidden_states = merged.get("output_hidden_states")
    if output_hidden_states is None:
        output_hidden_states = getattr(config, "output_hidden_states", False)
    encoded = encode(model, input_ids, merged.get("attention_mask"), merged.get("token_type_ids"), position_ids,
                     inputs_embeds, bool(output_hidden_states))
    last = encoded.packing.unpack(encoded.hidden)
    output = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=last,
        pooler_output=model.pooler(last) if model.pooler is not None else None,
        hidden_states=encoded.padded_states(),
    )
    return_dict = merged.get("return_dict")
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return output if return_dict else output.to_tuple()


def _accelerated(original: Callable, family: Family) -> Callable:
    """A forward that runs the packed path, or ``original`` when the call asks for what it cannot do."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            arguments = _flatten(signature.bind(self, *args, **kwargs).arguments)
        except TypeError:  # transformers raises its own error for a call it does not accept
            return original(self, *args, **kwargs)
        if fallback_reason(self, arguments) is not None:
            return original(self, *args, **kwargs)
        return _packed_forward(self, family, arguments)

    forward._bertfast_accelerated = True
    return forward


def is_accelerated(model: nn.Module) -> bool:
    """Whether ``model`` is a base model whose forward runs bertfast (by accelerate or patch_transformers)."""
    return getattr(model.forward, "_bertfast_accelerated", False)


def _class_forward(cls: type) -> Callable:
    for klass in cls.__mro__:
        if klass in _ORIGINAL_FORWARD:
            return _ORIGINAL_FORWARD[klass]
        if "forward" in klass.__dict__:
            return klass.__dict__["forward"]
    raise TypeError(f"{cls.__name__} has no forward")


def _supported_names() -> str:
    return ", ".join(f"{f.base_class} (and its heads)" for f in FAMILIES.values())


def accelerate(model: nn.Module) -> nn.Module:
    """Run every supported transformers base model inside ``model`` on bertfast, in place; returns ``model``.

    ``model`` is a transformers model of a family in ``FAMILIES`` (BERT, RoBERTa, XLM-RoBERTa,
    CamemBERT, DistilBERT, ELECTRA, ALBERT, MPNet; base or any head), or
    any module holding them (a SentenceTransformer, a PeftModel, a user's model). Parameters, state
    dict keys, classes and forward signatures stay as they were, so an optimizer built before the
    call keeps working and ``save_pretrained`` writes the same checkpoint. bertfast's own models are
    returned as they are. Calling it twice is harmless.
    """
    from bertfast.models.base import BertPreTrainedModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"bertfast.accelerate takes a torch.nn.Module, got {type(model).__name__}")
    found = False
    for module in model.modules():
        if isinstance(module, BertPreTrainedModel):
            found = True
            continue
        family = _family_of(module)
        if family is None:
            continue
        reason = _unsupported_config(module.config)
        if reason is not None:
            raise ValueError(f"bertfast.accelerate: {type(module).__name__} with {reason} is not supported")
        found = True
        if not is_accelerated(module):
            module.forward = types.MethodType(_accelerated(_class_forward(type(module)), family), module)
    if not found:
        raise TypeError(
            f"bertfast.accelerate: {type(model).__name__} is not, and does not contain, a supported model; "
            f"supported: {_supported_names()}"
        )
    return model


def patch_transformers() -> None:
    """From now on, every transformers model of a family in ``FAMILIES`` runs on bertfast.

    Patches the base classes' ``forward``, so models built by ``AutoModel*``, ``pipeline``,
    sentence-transformers or a Trainer script are accelerated (and existing ones too). Calling it
    twice is harmless; :func:`unpatch_transformers` undoes it.
    """
    for cls, family in _family_classes().items():
        if cls not in _ORIGINAL_FORWARD:
            _ORIGINAL_FORWARD[cls] = cls.__dict__["forward"]
            cls.forward = _accelerated(_ORIGINAL_FORWARD[cls], family)


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers` (models accelerated one by one with :func:`accelerate` stay so)."""
    for cls, original in list(_ORIGINAL_FORWARD.items()):
        cls.forward = original
        del _ORIGINAL_FORWARD[cls]

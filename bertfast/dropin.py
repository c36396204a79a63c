"""The drop-in: transformers' BERT-family models run on bertfast's packed, fused encoder.

``accelerate(model)`` marks every supported base model inside ``model`` (a ``BertModel``,
``RobertaModel``, ... on its own, under a task head, in a PEFT or sentence-transformers wrapper, or
in a user's module) as accelerated; ``patch_transformers()`` marks every instance of those classes,
whoever builds it. The marks take effect through two class-level wrappers, installed once per
class: the base model's ``forward`` runs bertfast's encoder (reading the same submodules) for a
marked instance, and the layer's ``forward`` runs bertfast's fused layer when that encoder calls the
layer as a module, so transformers' per-layer checkpointing still applies. Nothing else changes: the
parameters are the same objects, the state dict, the class and the heads are transformers' own.

A call that the packed path cannot honour runs transformers' own forward instead (see
``fallback_reason``), so the answer is always transformers' answer. One difference is by design:
the encoder's outputs at padded positions are zeros (bertfast never computes padding), where
transformers returns the values its attention happens to give those positions.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from bertfast import sentence_embeddings
from bertfast.encoders import albert, deberta_v2, distilbert, electra, modernbert, mpnet
from bertfast.models.base import encode
from bertfast.modules import PACKING_KEY, ROWS_KEY, packed_embeddings, packed_layer


@dataclass(frozen=True)
class Family:
    """A transformers model family whose base model bertfast runs.

    ``base_class`` and ``layer_class`` name classes in ``module``. bertfast wraps both classes'
    ``forward`` once: the base model's runs the packed path for accelerated instances, and the
    layer's runs ``packed_layer`` when the packed encoder calls it (``PACKING_KEY``), so that the
    layer is still called as a module (checkpointing, as the class does it). ``packed_embeddings``
    computes the packed embeddings. Both take ``bertfast.modules``' arguments. A family whose module
    tree is not BERT's names its ``bertfast.encoders`` module as ``encoder``, which runs the base model.
    """

    module: str
    base_class: str
    layer_class: str
    positions_after_padding: bool  # RoBERTa-style: position ids start at padding_idx + 1 and skip padding
    packed_layer: Callable[..., Tensor] = packed_layer
    packed_embeddings: Callable[..., Tensor] = packed_embeddings
    encoder: ModuleType | None = None


# model_type -> family. One registry for accelerate() and patch_transformers().
FAMILIES: dict[str, Family] = {
    "bert": Family("transformers.models.bert.modeling_bert", "BertModel", "BertLayer", False),
    "roberta": Family("transformers.models.roberta.modeling_roberta", "RobertaModel", "RobertaLayer", True),
    "xlm-roberta": Family("transformers.models.xlm_roberta.modeling_xlm_roberta", "XLMRobertaModel",
                          "XLMRobertaLayer", True),
    "camembert": Family("transformers.models.camembert.modeling_camembert", "CamembertModel", "CamembertLayer",
                        True),
    "distilbert": Family("transformers.models.distilbert.modeling_distilbert", "DistilBertModel", "TransformerBlock",
                         False, distilbert.packed_layer, encoder=distilbert),
    "electra": Family("transformers.models.electra.modeling_electra", "ElectraModel", "ElectraLayer", False,
                      encoder=electra),
    "albert": Family("transformers.models.albert.modeling_albert", "AlbertModel", "AlbertLayer", False,
                     albert.packed_layer, encoder=albert),
    "mpnet": Family("transformers.models.mpnet.modeling_mpnet", "MPNetModel", "MPNetLayer", True, mpnet.packed_layer,
                    encoder=mpnet),
    "modernbert": Family("transformers.models.modernbert.modeling_modernbert", "ModernBertModel",
                         "ModernBertEncoderLayer", False, modernbert.packed_layer, encoder=modernbert),
    "deberta-v2": Family("transformers.models.deberta_v2.modeling_deberta_v2", "DebertaV2Model", "DebertaV2Layer",
                         False, deberta_v2.packed_layer, encoder=deberta_v2),
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

# The instance flag accelerate() sets. It lives in the instance's __dict__, which copies carry:
# deepcopy, and the replicas that nn.DataParallel / torch.nn.parallel.replicate make.
_FLAG = "_bertfast_accelerated"
_WRAPPED: set[type] = set()  # base and layer classes whose forward bertfast has wrapped
_patched = False  # patch_transformers(): every instance of the family classes runs accelerated


@functools.cache
def _family_classes() -> dict[type, Family]:
    """Each importable family's base class -> its family."""
    classes = {}
    for family in FAMILIES.values():
        try:
            module = importlib.import_module(family.module)
        except ImportError:
            continue
        classes[getattr(module, family.base_class)] = family
    return classes


def _unsupported_config(config: Any) -> str | None:
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "is_decoder / add_cross_attention (causal or cross-attention)"
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        return f"position_embedding_type={position_type!r}"
    check = _encoder_check(FAMILIES.get(getattr(config, "model_type", None)), "unsupported")
    return None if check is None else check(config)


def _encoder_check(family: Family | None, name: str) -> Callable | None:
    """A family encoder's own ``unsupported`` (config) / ``fallback`` (model, call) check, where it has one."""
    return None if family is None or family.encoder is None else getattr(family.encoder, name, None)


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
    check = _encoder_check(FAMILIES.get(getattr(config, "model_type", None)), "fallback")
    reason = None if check is None else check(model, merged)
    return reason if reason is not None else _hook_reason(model)


# A module's hook registries, and what a hook in each is called.
_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
          ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def _hook_is(hook: Callable, name: str | tuple[str, ...], packages: tuple[str, ...]) -> bool:
    """Whether ``hook`` is the function of that name that one of ``packages`` defines."""
    code = getattr(hook, "__code__", None)
    names = (name,) if isinstance(name, str) else name
    return (code is not None and code.co_name in names
            and getattr(hook, "__module__", "").partition(".")[0] in packages)


def _is_recorder(hook: Callable) -> bool:
    """transformers' output recorder: installed once, it stays, and it only records while a collector is active."""
    return _hook_is(hook, "output_capturing_hook", ("transformers",))


def _is_input_grad_hook(hook: Callable) -> bool:
    """``enable_input_require_grads``' hook (transformers' or PEFT's): the packed path does what it does."""
    return _hook_is(hook, ("make_inputs_require_grads", "make_inputs_require_grad"), ("transformers", "peft"))


def _recorder_active() -> bool:
    """Whether an enclosing transformers model is recording outputs (its recorder hooks would fire on ours)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    return bool(_active_collector.get())


def _module_hook_reason(module: nn.Module, is_input_embeddings: bool) -> str | None:
    state = module.__dict__
    if not (state["_forward_pre_hooks"] or state["_forward_hooks"] or state["_backward_pre_hooks"]
            or state["_backward_hooks"] or "_hf_hook" in state or "forward" in state):
        return None  # the common case, checked first: this runs for every submodule on every call
    if "_hf_hook" in state:
        return "an accelerate hook"
    if "forward" in state:  # set on the instance: the packed path would not call it
        return "an instance forward"
    for attr, kind in _HOOKS:
        for hook in state[attr].values():
            if _is_recorder(hook):
                if _recorder_active():
                    return "transformers' output recorder of an enclosing model"
            elif not (is_input_embeddings and attr == "_forward_hooks" and _is_input_grad_hook(hook)):
                return kind
    return None


def _hook_reason(model: nn.Module) -> str | None:
    """A hook that the packed path would skip or feed packed tensors: "forward hook on encoder.layer.1".

    The packed path does not call the embeddings, the encoder or the layers' submodules the way
    transformers' forward does (and calls the layers with packed tokens), so any hook on them, or a
    global module hook, sends the call to transformers' forward, where every hook sees transformers'
    tensors. The pooler is called as transformers calls it, so its hooks run either way.
    """
    from torch.nn.modules import module as torch_module

    for attr, kind in _HOOKS:
        if getattr(torch_module, "_global" + attr, None):
            return f"a global module {kind} (torch.nn.modules.module.register_module_{kind.replace(' ', '_')})"
    input_embeddings = _input_embeddings(model)
    # A plain walk of the module tree: Module.modules() costs more than the checks on every call
    stack = [child for name, child in model._modules.items() if name != "pooler" and child is not None]
    while stack:
        module = stack.pop()
        reason = _module_hook_reason(module, module is input_embeddings)
        if reason is not None:
            name = next(n for n, m in model.named_modules() if m is module)
            return f"{reason} on {name}"
        stack.extend(child for child in module._modules.values() if child is not None)
    return None


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token embedding module (``word_embeddings``, ModernBERT's ``tok_embeddings``), as transformers finds it."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _requires_input_grads(model: nn.Module) -> bool:
    """Whether ``enable_input_require_grads`` hooked the input embeddings (the packed path then does the same)."""
    words = _input_embeddings(model)
    return words is not None and any(_is_input_grad_hook(h) for h in words._forward_hooks.values())


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
        return family.encoder.packed_forward(model, {**merged, "position_ids": position_ids},
                                             embeddings_require_grad=_requires_input_grads(model))
    selected = _hidden_state_indices(config, _call_or_config(merged, config, "output_hidden_states", False))
    encoded = encode(model, input_ids, merged.get("attention_mask"), merged.get("token_type_ids"), position_ids,
                     inputs_embeds, selected is not None, embed=family.packed_embeddings,
                     embeddings_require_grad=_requires_input_grads(model))
    last = encoded.packing.unpack(encoded.hidden)
    hidden_states = None
    if selected is not None:
        final = len(encoded.states) - 1  # transformers hands the last one out as last_hidden_state itself
        hidden_states = tuple(None if i not in selected else last if i == final else encoded.packing.unpack(s)
                              for i, s in enumerate(encoded.states))
    sentence_embeddings.attach(last, encoded.hidden, encoded.packing, merged.get("attention_mask"))
    output = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=last,
        pooler_output=model.pooler(last) if model.pooler is not None else None,
        hidden_states=hidden_states,
    )
    return output.to_tuple() if _call_or_config(merged, config, "return_dict", True) is False else output


def _call_or_config(merged: dict[str, Any], config: Any, name: str, default: Any) -> Any:
    """An output option as transformers 5 reads it: the call's value when passed (None included), else the config's."""
    return merged[name] if name in merged else getattr(config, name, default)


def _hidden_state_indices(config: Any, request: Any) -> set[int] | None:
    """The hidden states ``output_hidden_states`` asks for, read as transformers' output recorder reads it.

    A true flag: all (the embeddings, then each layer). An index or a list of them: those, counting
    negative ones from the end and dropping any out of range; the others come back as None. A false
    value (False, None, 0, []): none.
    """
    if not request:
        return None
    count = config.num_hidden_layers + 1
    if isinstance(request, bool):
        return set(range(count))
    indices = [request] if isinstance(request, int) else list(request)
    return {i % count for i in indices if -count <= i < count}


def _base_forward(original: Callable, family: Family) -> Callable:
    """The base class's forward: the packed path for an accelerated instance, else ``original``.

    ``original`` also runs every call the packed path cannot honour (see :func:`fallback_reason`).
    """
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not (_patched or self.__dict__.get(_FLAG, False)):
            return original(self, *args, **kwargs)
        try:
            arguments = _flatten(signature.bind(self, *args, **kwargs).arguments)
        except TypeError:  # transformers raises its own error for a call it does not accept
            return original(self, *args, **kwargs)
        if fallback_reason(self, arguments) is not None:
            return original(self, *args, **kwargs)
        return _packed_forward(self, family, arguments)

    return forward


def _checkpointing_forward(forward: Callable) -> bool:
    """Whether ``forward`` is the wrapper transformers' GradientCheckpointingLayer puts on a layer's forward."""
    code = getattr(forward, "__code__", None)
    return code is not None and code.co_name == "forward_with_checkpointing" and hasattr(forward, "__wrapped__")


def _install_layer_forward(cls: type, family: Family) -> None:
    """Make ``cls``'s forward run ``family.packed_layer`` when the packed encoder calls it.

    transformers 5's GradientCheckpointingLayer wraps each layer class's forward so that the layer
    checkpoints itself (its ``gradient_checkpointing`` flag and ``_gradient_checkpointing_func``).
    That wrapper checkpoints only while it is the class's forward, so bertfast's dispatch goes under
    it: it replaces the forward the wrapper calls and lets the class wrap it again. The packed layer
    call is then checkpointed by transformers' own code, exactly as the layer's own forward is.
    """
    current = cls.__dict__["forward"]
    rewrap = _checkpointing_forward(current)
    inner = current.__wrapped__ if rewrap else current

    @functools.wraps(inner)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        packing = kwargs.pop(PACKING_KEY, None)
        if packing is None:
            return inner(self, *args, **kwargs)
        return family.packed_layer(self, args[0], packing, kwargs.pop(ROWS_KEY, None), self.training)

    cls.forward = forward
    if rewrap:
        from transformers.modeling_layers import GradientCheckpointingLayer

        GradientCheckpointingLayer.__dict__["__init_subclass__"].__func__(cls)


def _install(base_cls: type, family: Family) -> None:
    """Wrap the family's base and layer classes' forward, once per class."""
    if base_cls not in _WRAPPED:
        base_cls.forward = _base_forward(base_cls.__dict__["forward"], family)
        _WRAPPED.add(base_cls)
    layer_cls = getattr(importlib.import_module(family.module), family.layer_class)
    if layer_cls not in _WRAPPED:
        _install_layer_forward(layer_cls, family)
        _WRAPPED.add(layer_cls)


def _family_base(module: nn.Module) -> tuple[type, Family] | None:
    classes = _family_classes()
    for cls in type(module).__mro__:
        if cls in classes:
            return cls, classes[cls]
    return None


def is_accelerated(model: nn.Module) -> bool:
    """Whether ``model`` is a base model whose forward runs bertfast (by accelerate or patch_transformers)."""
    found = _family_base(model)
    return found is not None and found[0] in _WRAPPED and (_patched or model.__dict__.get(_FLAG, False))


def _supported_names() -> str:
    return ", ".join(f"{f.base_class} (and its heads)" for f in FAMILIES.values())


def accelerate(model: nn.Module) -> nn.Module:
    """Run every supported transformers base model inside ``model`` on bertfast, in place; returns ``model``.

    ``model`` is a transformers model of a family in ``FAMILIES`` (BERT, RoBERTa, XLM-RoBERTa,
    CamemBERT, DistilBERT, ELECTRA, ALBERT, MPNet, ModernBERT, DeBERTa-v2/v3; base or any head), or
    any module holding them (a SentenceTransformer, a PeftModel, a user's model). Parameters, state
    dict keys, classes and forward signatures stay as they were, so an optimizer built before the
    call keeps working and ``save_pretrained`` writes the same checkpoint. bertfast's own models are
    returned as they are. Calling it twice is harmless. The mark it leaves is an instance attribute,
    so copies (``copy.deepcopy``, ``nn.DataParallel``'s replicas) run accelerated on their own
    parameters.
    """
    from bertfast.models.base import BertPreTrainedModel

    if not isinstance(model, nn.Module):
        raise TypeError(f"bertfast.accelerate takes a torch.nn.Module, got {type(model).__name__}")
    found = False
    for module in model.modules():
        if isinstance(module, BertPreTrainedModel):
            found = True
            continue
        base = _family_base(module)
        if base is None:
            continue
        reason = _unsupported_config(module.config)
        if reason is not None:
            raise ValueError(f"bertfast.accelerate: {type(module).__name__} with {reason} is not supported")
        found = True
        _install(*base)
        module.__dict__[_FLAG] = True
    if not found:
        raise TypeError(
            f"bertfast.accelerate: {type(model).__name__} is not, and does not contain, a supported model; "
            f"supported: {_supported_names()}"
        )
    sentence_embeddings.route(model)  # a SentenceTransformer's Pooling / Normalize read the packed tokens
    return model


def patch_transformers() -> None:
    """From now on, every transformers model of a family in ``FAMILIES`` runs on bertfast.

    Patches the base classes' ``forward``, so models built by ``AutoModel*``, ``pipeline``,
    sentence-transformers or a Trainer script are accelerated (and existing ones too). Calling it
    twice is harmless; :func:`unpatch_transformers` undoes it.
    """
    global _patched
    for cls, family in _family_classes().items():
        _install(cls, family)
    _patched = True
    sentence_embeddings.patch()


def unpatch_transformers() -> None:
    """Undo :func:`patch_transformers` (models accelerated one by one with :func:`accelerate` stay so)."""
    global _patched
    _patched = False
    sentence_embeddings.unpatch()

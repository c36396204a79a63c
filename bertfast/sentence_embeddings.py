"""sentence-transformers on the packed encoder: pooling and normalisation read the packed tokens.

An accelerated base model (``bertfast.accelerate`` / ``patch_transformers``) still returns
``last_hidden_state`` as transformers does, padded to (batch, seq, hidden): that is the
``token_embeddings`` of sentence-transformers' ``Transformer`` module contract, and
``encode(output_value="token_embeddings")`` reads it. The tensor also carries the packed rows it was
made from (:func:`attach`), so the ``Pooling`` module that follows can compute the sentence embedding
with one fused op on the packed (T, hidden) rows (``bertfast.ops.pooling``) instead of masking and
summing the padded tensor, and the backward pass never touches the padded tensor at all.

``Pooling`` and ``Normalize`` are routed, not replaced: the model keeps its modules, configs and saved
files, and each call takes the fused path only when the result is exactly what the module computes:

* ``Pooling``: every mode ``mean`` or ``cls``, the packed rows belong to this call's token embeddings
  and attention mask, and no feature changes the pooling (``include_prompt=False`` with a
  ``prompt_length``, ``token_weights_sum``, ``cls_token_embeddings``, flattened ``cu_seq_lens_q``
  inputs). Anything else (``max``, ``weightedmean``, ``lasttoken``, ...) runs the module's own code.
* ``Normalize``: its input is a single-mode embedding that a routed ``Pooling`` made and that nothing
  has modified since (its version counter says so; under ``inference_mode``, which keeps none, and
  where no backward follows, Normalize runs its own code); it then runs the pooling op once more with
  the normalisation fused in (the un-normalised forward is one read of the packed rows, and only the
  fused op enters the backward).
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bertfast import ops
from bertfast.padding import Packing

_PACKED = "_bertfast_packed"  # on token embeddings: the PackedTokens they were unpacked from
_POOLED = "_bertfast_pooled"  # on a sentence embedding: the Pooled op call that made it
_ORIGINAL_FORWARD: dict[type, Callable] = {}  # classes routed by patch()


@dataclass(frozen=True)
class PackedTokens:
    """The packed last layer behind a padded ``last_hidden_state``."""

    hidden: Tensor  # (T, hidden)
    packing: Packing
    attention_mask: Tensor | None  # the mask the encoder was called with (the same object)


@dataclass(frozen=True)
class Pooled:
    """How a routed Pooling made a sentence embedding, for the Normalize after it."""

    tokens: PackedTokens
    mode: str
    version: int  # the embedding's ``_version`` when made: an in-place change since makes it stale


def attach(last_hidden_state: Tensor, hidden: Tensor, packing: Packing, attention_mask: Tensor | None) -> None:
    """Record on ``last_hidden_state`` the packed rows and packing it was unpacked from."""
    setattr(last_hidden_state, _PACKED, PackedTokens(hidden, packing, attention_mask))


def packed_tokens(features: dict[str, Any]) -> PackedTokens | None:
    """The packed rows behind ``features["token_embeddings"]``, when they belong to this call's mask."""
    tokens = getattr(features.get("token_embeddings"), _PACKED, None)
    if tokens is None or features.get("attention_mask") is not tokens.attention_mask:
        return None
    return tokens


def _modes(pooling: nn.Module) -> tuple[str, ...]:
    mode = pooling.pooling_mode
    return (mode,) if isinstance(mode, str) else tuple(mode)


def pooling_fallback_reason(pooling: nn.Module, features: dict[str, Any]) -> str | None:
    """Why this Pooling call runs sentence-transformers' code, or None when the fused op computes it."""
    if packed_tokens(features) is None:
        return "the token embeddings do not come from bertfast's packed encoder with this attention mask"
    modes = _modes(pooling)
    unsupported = [mode for mode in modes if mode not in ops.reference.POOLING_MODES]
    if unsupported:
        return f"pooling mode(s) {unsupported}"
    if not pooling.include_prompt and "prompt_length" in features:
        return "include_prompt=False with a prompt_length"
    if "mean" in modes and "token_weights_sum" in features:
        return "token_weights_sum"
    if "cls" in modes and "cls_token_embeddings" in features:
        return "cls_token_embeddings"
    if "cu_seq_lens_q" in features:
        return "flattened inputs (cu_seq_lens_q)"
    return None


def _routed_pooling(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self: nn.Module, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if pooling_fallback_reason(self, features) is not None:
            return original(self, features, **kwargs)
        tokens = packed_tokens(features)
        modes = _modes(self)
        vectors = [ops.pooling(tokens.hidden, tokens.packing.cu_seqlens, mode) for mode in modes]
        embedding = vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)  # in the module's order
        if len(modes) == 1 and not embedding.is_inference():  # inference tensors keep no version counter
            setattr(embedding, _POOLED, Pooled(tokens, modes[0], embedding._version))
        features["sentence_embedding"] = embedding
        return features

    forward._bertfast_routed = True
    return forward


def _routed_normalize(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self: nn.Module, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        x = features.get(self.module_input_name)
        pooled: Pooled | None = getattr(x, _POOLED, None)
        if pooled is None or x._version != pooled.version:
            return original(self, features, **kwargs)
        tokens = pooled.tokens
        features[self.module_output_name] = ops.pooling(tokens.hidden, tokens.packing.cu_seqlens, pooled.mode,
                                                        normalize=True)
        return features

    forward._bertfast_routed = True
    return forward


def _module_classes() -> dict[type, Callable[[Callable], Callable]]:
    """sentence-transformers' Pooling and Normalize -> their routing (none if it was never imported)."""
    if "sentence_transformers" not in sys.modules:
        return {}
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    return {Pooling: _routed_pooling, Normalize: _routed_normalize}


def is_routed(module: nn.Module) -> bool:
    return getattr(module.forward, "_bertfast_routed", False)


def route(model: nn.Module) -> None:
    """Route every Pooling and Normalize module inside ``model`` (instances of exactly those classes)."""
    classes = _module_classes()
    for module in model.modules():
        routing = classes.get(type(module))
        if routing is not None and not is_routed(module):
            original = _ORIGINAL_FORWARD.get(type(module), type(module).forward)
            module.forward = types.MethodType(routing(original), module)


def patch() -> None:
    """Route the Pooling and Normalize classes themselves (for ``patch_transformers``)."""
    for cls, routing in _module_classes().items():
        if cls not in _ORIGINAL_FORWARD:
            _ORIGINAL_FORWARD[cls] = cls.__dict__["forward"]
            cls.forward = routing(_ORIGINAL_FORWARD[cls])


def unpatch() -> None:
    for cls, original in list(_ORIGINAL_FORWARD.items()):
        cls.forward = original
        del _ORIGINAL_FORWARD[cls]

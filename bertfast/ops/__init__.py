"""The op layer: every hot operation of the model goes through one of these functions.

Each op has a plain-PyTorch reference (``bertfast.ops.reference``) and may have
faster implementations:

* ``triton``: Triton kernels in ``bertfast.kernels`` (CUDA tensors; CPU tensors
  too when ``TRITON_INTERPRET=1``, which is how the tests run them),
* ``native``: the CPU implementations: C++ kernels in ``bertfast._C`` (bias+GELU, and
  the dropout of the embeddings, attention and residual ops) and, where that is what is
  fastest, chunked PyTorch (the masked-LM cross-entropy),
* ``torch``: the reference.

The backend is chosen per call: CUDA tensors use ``triton``, CPU tensors use
``native`` where it implements the op, and everything else the reference.
``BERTFAST_BACKEND=torch|triton|native`` (or :func:`use_backend`) forces one;
an op that the forced backend does not implement runs the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from functools import cache

import torch
from torch import Tensor

from bertfast.ops import reference
from bertfast.padding import Packing

BACKENDS = ("torch", "triton", "native")
IGNORE_INDEX = -100  # labels that the losses skip, as in torch.nn.functional.cross_entropy

# op name -> {backend: "module:function"}; imported lazily, on first use.
_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "embeddings": {
        "triton": "bertfast.kernels.embeddings:embeddings",
        "native": "bertfast.ops.native:embeddings",
    },
    "bias_gelu": {
        "triton": "bertfast.kernels.bias_gelu:bias_gelu",
        "native": "bertfast.ops.native:bias_gelu",
    },
    "bias_dropout_add_layernorm": {
        "triton": "bertfast.kernels.bias_dropout_add_layernorm:bias_dropout_add_layernorm",
        "native": "bertfast.ops.native:bias_dropout_add_layernorm",
    },
    "bias_gelu_layernorm": {"triton": "bertfast.kernels.bias_gelu_layernorm:bias_gelu_layernorm"},
    "attention": {
        "triton": "bertfast.kernels.attention:attention",
        "native": "bertfast.ops.native:attention",
    },
    "linear_cross_entropy": {
        "triton": "bertfast.kernels.cross_entropy:linear_cross_entropy",
        # Chunked PyTorch: the same memory bound and in-forward gradients as the kernel path.
        "native": "bertfast.kernels.cross_entropy:linear_cross_entropy_torch",
    },
}

_forced: str | None = None


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown bertfast backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``BERTFAST_BACKEND``, if any."""
    if _forced is not None:
        return _forced
    env = os.environ.get("BERTFAST_BACKEND", "").strip().lower()
    return _check_backend(env) if env else None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for the ops called inside the block (``None`` restores automatic choice)."""
    global _forced
    previous = _forced
    _forced = _check_backend(name) if name is not None else None
    try:
        yield
    finally:
        _forced = previous


@cache
def _load(target: str) -> Callable | None:
    """The implementation at ``module:function``, or None when its backend is not installed here.

    Only a missing backend (no triton, no compiled extension) means "use the reference"; any other
    import error is a bug and is raised rather than silently hidden behind the reference.
    """
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in ("triton", "bertfast._C"):
            return None
        raise
    return getattr(module, attr)


def implementation(op: str, like: Tensor) -> tuple[str, Callable]:
    """(backend, function) that runs ``op`` for tensors like ``like``."""
    available = _IMPLEMENTATIONS[op]
    backend = forced_backend()
    if backend is None:
        backend = "triton" if like.is_cuda else "native"
    fn = _load(available[backend]) if backend in available else None
    if fn is None:
        return "torch", getattr(reference, op)
    return backend, fn


def _zeros_if_none(bias: Tensor | None, x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[-1]) if bias is None else bias


def embeddings(
    input_ids: Tensor | None,
    position_ids: Tensor,
    token_type_ids: Tensor,
    word_weight: Tensor,
    position_weight: Tensor,
    type_weight: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    dropout_p: float,
    training: bool,
    inputs_embeds: Tensor | None = None,
    padding_idx: int | None = None,
) -> Tensor:
    """dropout(LayerNorm(word + position + token-type embeddings)), packed (T,) ids -> (T, H)."""
    _, fn = implementation("embeddings", word_weight)
    return fn(
        input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight,
        ln_weight, ln_bias, eps, dropout_p, training, inputs_embeds=inputs_embeds, padding_idx=padding_idx,
    )


def bias_gelu(x: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """gelu(x + bias)."""
    bias = _zeros_if_none(bias, x)
    _, fn = implementation("bias_gelu", x)
    return fn(x, bias, approximate)


def bias_dropout_add_layernorm(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    eps: float, dropout_p: float, training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual)."""
    bias = _zeros_if_none(bias, x)
    _, fn = implementation("bias_dropout_add_layernorm", x)
    return fn(x, bias, residual, ln_weight, ln_bias, eps, dropout_p, training)


def bias_gelu_layernorm(
    x: Tensor, bias: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float, approximate: str = "none"
) -> Tensor:
    """LayerNorm(gelu(x + bias))."""
    bias = _zeros_if_none(bias, x)
    _, fn = implementation("bias_gelu_layernorm", x)
    return fn(x, bias, ln_weight, ln_bias, eps, approximate)


def attention(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None,
) -> Tensor:
    """Bidirectional attention on packed sequences: (T, 3, heads, head_dim) -> (T, heads, head_dim)."""
    _, fn = implementation("attention", qkv)
    return fn(qkv, cu_seqlens, max_seqlen, dropout_p, training, softmax_scale)


def padded_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None,
) -> Tensor:
    """Attention on a padded (B, S, heads, head_dim) batch with a (B, S) key-padding mask (True = real).

    Packs the real tokens, runs :func:`attention` (whichever backend it picks) and unpacks; padded
    query rows come back as zeros.
    """
    packing = Packing.from_mask(key_padding_mask)
    qkv = packing.pack(torch.stack([q, k, v], dim=2))
    out = attention(qkv, packing.cu_seqlens, packing.max_seqlen, dropout_p, training, softmax_scale)
    return packing.unpack(out)


def linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, number of correct argmax predictions) of cross-entropy over ``x @ weight.T + bias``."""
    _, fn = implementation("linear_cross_entropy", x)
    return fn(x, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk_bytes)


__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "attention",
    "bias_dropout_add_layernorm",
    "bias_gelu",
    "bias_gelu_layernorm",
    "embeddings",
    "forced_backend",
    "implementation",
    "linear_cross_entropy",
    "padded_attention",
    "reference",
    "use_backend",
]

"""The op layer: every hot operation of the model goes through one of these functions.

One path per call: the front function here checks its arguments, asks ``bertfast.ops.dispatch`` which
backend runs the call, and calls that backend's entry, which calls its ``bertfast::`` op:

* ``native``: the CPU ops, C++ kernels registered with torch (``TORCH_LIBRARY``; ``bertfast.ops.native``),
  float32 and bfloat16: bias+GELU, gated GELU, rotary embeddings, dropout (of the embeddings and residual
  ops), packed attention (inference and training, with dropout, the relative-position bias and a sliding
  window), and in inference add+LayerNorm; and the chunked masked-LM loss
  (``bertfast.ops.chunked_cross_entropy``);
* ``triton``: Triton kernels in ``bertfast.kernels`` (CUDA tensors; CPU tensors too when
  ``TRITON_INTERPRET=1``, which is how the tests run them), as ``torch.library.triton_op``s. Their
  sources are the top-level ``kernels/`` folder, one op family per module; it has no ``__init__.py`` on
  purpose, so that Python started in a clone's root never takes it for the PyPI package ``kernels``
  that transformers imports (a regular package outranks a namespace portion);
* ``torch``: the reference (``bertfast.ops.reference``), plain PyTorch.

Every op has a schema, a fake implementation and its autograd registered once, so that all of them run
inside ``torch.compile(fullgraph=True)`` without a graph break. Unforced, CUDA tensors use ``triton`` and
CPU tensors ``native``, each where its ``supports`` predicate accepts the inputs, and the reference
otherwise. The one switch that forces a backend (for benchmarks and tests) is
``BERTFAST_BACKEND=torch|triton|native`` (read once, at import) or :func:`use_backend`;
:func:`implementation` reports the backend that runs a call.

The layers below this module import nothing above them: ``bertfast.common`` (op registration helpers, the
dropout policy, constants), then the implementations (reference, native, Triton), then this front.

Dropout
-------
One policy for every op and every backend (this is the one place it is written down):

* **Seed.** Each op call with dropout draws one seed: a 0-dim int64 tensor from torch's generator
  of the tensor's device (``torch.randint`` on that device, in the op's traced Python wrapper;
  ``bertfast.common.dropout.draw_seed``). The generator advances by one draw per dropout op call, in
  the order the model calls them. The seed never visits the host, so a CUDA graph can capture the
  step, and ``torch.compile`` traces the draw like any other random op.
* **Mask.** Within a call the mask is a pure function of (seed, row, column), computed where it is
  used and never stored: backward regenerates it from the saved seed. An element is kept when
  ``mix32(mix32(column ^ k0) + (row ^ k1)) >> 1 >= round(p * 2**31)``, (k0, k1) mixed from the
  seed (``bertfast.common.dropout.keep_mask``; mod 2**32 arithmetic). The row is the packed token
  (for attention probabilities, query token * heads + head) and the column the hidden unit (the
  key's position in its sequence), so the mask does not depend on padding or on ``max_seqlen``.
  The Triton kernels, the C++ kernel and the reference compute this same function bit for bit:
  for a seed, every backend drops the same elements.
* **Reproducible runs.** ``torch.manual_seed`` (and ``torch.cuda.manual_seed_all``) before the run;
  the same ops on the same shapes then draw the same seeds, on any backend. Under ``torch.compile``
  the draws come from the compiled graph's random stream (Inductor's), which repeats for a seed too
  but differs from eager's.
* **Activation checkpointing** (``torch.utils.checkpoint``, non-reentrant) restores the generator
  state before recomputing a layer, so the recomputation draws the same seeds and applies the same
  masks: gradients equal those of the run without checkpointing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bertfast.common import IGNORE_INDEX, dropout
from bertfast.ops import chunked_cross_entropy, dispatch, reference
from bertfast.ops.dispatch import BACKENDS, forced_backend, implementation, use_backend
from bertfast.padding import Packing


def _register_backends() -> None:
    try:
        from bertfast.ops import native
    except ModuleNotFoundError as e:  # no compiled extension: no native backend
        if e.name != "bertfast._C":
            raise
    else:
        for op in ("embeddings", "bias_gelu", "bias_dropout_add_layernorm"):
            dispatch.register(op, "native", getattr(native, op), native.supports)
        dispatch.register("attention", "native", native.attention, native.supports_attention)
        dispatch.register("rotary", "native", native.rotary, native.supports_rotary)
        dispatch.register("geglu", "native", native.geglu, native.supports)
        dispatch.register("pooling", "native", native.pooling, native.pooling_supports)
    # Chunked PyTorch: the same memory bound and in-forward gradients as the kernel path.
    dispatch.register("linear_cross_entropy", "native", chunked_cross_entropy.linear_cross_entropy,
                      chunked_cross_entropy.supports)
    try:
        from bertfast.kernels import (
            attention,
            bias_dropout_add_layernorm,
            bias_gelu,
            bias_gelu_layernorm,
            cross_entropy,
            embeddings,
            pooling,
        )
    except ModuleNotFoundError as e:  # no triton: no triton backend
        if e.name != "triton":
            raise
        return
    for module in (attention, bias_dropout_add_layernorm, bias_gelu, bias_gelu_layernorm, embeddings, pooling):
        op = module.__name__.rsplit(".", 1)[-1]
        dispatch.register(op, "triton", getattr(module, op), module.supports)
    dispatch.register("linear_cross_entropy", "triton", cross_entropy.linear_cross_entropy, cross_entropy.supports)


_register_backends()


def _check_approximate(approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


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
    dropout.check_probability(dropout_p)
    words = word_weight if inputs_embeds is None else inputs_embeds
    _, fn = implementation("embeddings", words, position_weight, type_weight, ln_weight, ln_bias)
    return fn(
        input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight,
        ln_weight, ln_bias, eps, dropout_p, training, inputs_embeds=inputs_embeds, padding_idx=padding_idx,
    )


def bias_gelu(x: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """gelu(x + bias); ``bias`` None: gelu(x)."""
    _check_approximate(approximate)
    _, fn = implementation("bias_gelu", x, bias, approximate=approximate)
    return fn(x, bias, approximate)


def bias_dropout_add_layernorm(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    eps: float, dropout_p: float, training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual); ``bias`` None: LayerNorm(dropout(x) + residual)."""
    dropout.check_probability(dropout_p)
    _, fn = implementation("bias_dropout_add_layernorm", x, bias, residual, ln_weight, ln_bias)
    return fn(x, bias, residual, ln_weight, ln_bias, eps, dropout_p, training)


def bias_gelu_layernorm(
    x: Tensor, bias: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float, approximate: str = "none"
) -> Tensor:
    """LayerNorm(gelu(x + bias)); ``bias`` None: LayerNorm(gelu(x))."""
    _check_approximate(approximate)
    _, fn = implementation("bias_gelu_layernorm", x, bias, ln_weight, ln_bias)
    return fn(x, bias, ln_weight, ln_bias, eps, approximate)


def attention(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None, bias_table: Tensor | None = None,
    num_buckets: int = 32, max_distance: int = 128, window: int | None = None, columns: Tensor | None = None,
    pos_key: Tensor | None = None, pos_query: Tensor | None = None, pos_index: Tensor | None = None,
) -> Tensor:
    """Bidirectional attention on packed sequences: (T, 3, heads, head_dim) -> (T, heads, head_dim).

    ``max_seqlen`` is an upper bound of the longest sequence (the padded width serves, and needs no
    host sync); sequences may be empty.

    ``bias_table`` (num_buckets, heads), differentiable: MPNet's relative-position bias, added to the
    scaled scores before the softmax: ``bias_table[relative_position_bucket(k - q), head]`` for key
    position k and query position q inside their sequence (``reference.relative_position_bucket``,
    with ``num_buckets`` and ``max_distance``).

    ``window``: sliding-window (local) attention, each query sees the keys of its sequence at most
    ``window`` positions away (ModernBERT's local layers); the CPU kernels compute only those scores.

    ``columns`` (T,) integers: each token's column in its padded row, increasing along each sequence. The
    bias's and the window's distances are then counted in columns, not in packed tokens, which is what
    transformers counts when an attention mask has holes (padding between a row's tokens).

    ``pos_key`` / ``pos_query`` (positions, heads, head_dim), differentiable, and ``pos_index`` (2 * max_seqlen - 1,)
    integers: DeBERTa's disentangled attention. The scaled score of query i and key j gains
    ``scale * (q_i . pos_key[c] + k_j . pos_query[c])`` (content-to-position and position-to-content; either table
    may be None), ``c = pos_index[(j - i) + max_seqlen - 1]`` the tables' row for their distance
    (``bertfast.common.relative_position.deberta_position_index``; distances in columns with ``columns``).
    """
    dropout.check_probability(dropout_p)
    if bias_table is not None:
        if qkv.dim() != 4:
            raise ValueError(f"qkv must be (tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
        reference.check_bias_table(bias_table, qkv.shape[2], num_buckets, max_distance)
    if window is not None and window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if columns is not None and (columns.shape != (qkv.shape[0],) or columns.dtype.is_floating_point):
        raise ValueError(f"columns must be ({qkv.shape[0]},) integers, got {tuple(columns.shape)} {columns.dtype}")
    _check_disentangled(qkv, max_seqlen, pos_key, pos_query, pos_index)
    _, fn = implementation("attention", qkv, bias_table, window=window, columns=columns, pos_index=pos_index)
    return fn(qkv, cu_seqlens, max_seqlen, dropout_p, training, softmax_scale, bias_table, num_buckets,
              max_distance, window, columns, pos_key, pos_query, pos_index)


def _check_disentangled(qkv: Tensor, max_seqlen: int, pos_key: Tensor | None, pos_query: Tensor | None,
                        pos_index: Tensor | None) -> None:
    tables = [t for t in (pos_key, pos_query) if t is not None]
    if (pos_index is None) != (not tables):
        raise ValueError("pos_index and at least one of pos_key and pos_query come together (DeBERTa's terms)")
    for name, t in (("pos_key", pos_key), ("pos_query", pos_query)):
        if t is not None and (t.dim() != 3 or tuple(t.shape[1:]) != tuple(qkv.shape[2:])):
            raise ValueError(f"{name} must be (positions, heads, head_dim) = (positions, {qkv.shape[2]}, "
                             f"{qkv.shape[3]}), got {tuple(t.shape)}")
    if pos_index is not None and (pos_index.shape != (max(2 * max_seqlen - 1, 1),)
                                  or pos_index.dtype.is_floating_point):
        raise ValueError(f"pos_index must be (2 * max_seqlen - 1,) integers, got {tuple(pos_index.shape)} "
                         f"{pos_index.dtype}")


def rotary(qkv: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary position embeddings applied to q and k of packed qkv (T, 3, heads, head_dim); v unchanged.

    ``positions`` (T,) integer positions of the tokens (inside their sequence, or as the caller counts
    them); ``inv_freq`` (head_dim / 2,) the frequencies, e.g. ``1 / theta ** (arange(0, d, 2) / d)``.
    """
    if qkv.dim() != 4 or qkv.shape[1] != 3 or qkv.shape[-1] % 2:
        raise ValueError(f"qkv must be (tokens, 3, heads, even head_dim), got {tuple(qkv.shape)}")
    if positions.shape != (qkv.shape[0],) or positions.dtype.is_floating_point:
        raise ValueError(f"positions must be ({qkv.shape[0]},) integers, got {tuple(positions.shape)} "
                         f"{positions.dtype}")
    if inv_freq.shape != (qkv.shape[-1] // 2,):
        raise ValueError(f"inv_freq must be ({qkv.shape[-1] // 2},), got {tuple(inv_freq.shape)}")
    _, fn = implementation("rotary", qkv, inv_freq)
    return fn(qkv, positions, inv_freq)


def geglu(x: Tensor, approximate: str = "none") -> Tensor:
    """Gated GELU of a bias-free projection: (rows, 2 N) -> (rows, N), gelu(x[:, :N]) * x[:, N:]."""
    _check_approximate(approximate)
    if x.shape[-1] % 2:
        raise ValueError(f"geglu needs an even last dimension (value and gate halves), got {tuple(x.shape)}")
    _, fn = implementation("geglu", x, approximate=approximate)
    return fn(x, approximate)


def padded_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None, bias_table: Tensor | None = None,
    num_buckets: int = 32, max_distance: int = 128,
) -> Tensor:
    """Attention on a padded (B, S, heads, head_dim) batch with a (B, S) key-padding mask (True = real).

    Packs the real tokens, runs :func:`attention` (whichever backend it picks) and unpacks; padded
    query rows come back as zeros. With ``bias_table``, positions are counted among each row's real
    tokens (for right-padded rows, their index in the row).
    """
    packing = Packing.from_mask(key_padding_mask)
    qkv = packing.pack(torch.stack([q, k, v], dim=2))
    out = attention(qkv, packing.cu_seqlens, packing.max_seqlen, dropout_p, training, softmax_scale,
                    bias_table, num_buckets, max_distance)
    return packing.unpack(out)


def linear_cross_entropy(
    x: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0, reduction: str = "mean", chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss, number of correct argmax predictions) of cross-entropy over ``x @ weight.T + bias``."""
    _, fn = implementation("linear_cross_entropy", x, weight, bias)
    return fn(x, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk_bytes)


def pooling(hidden: Tensor, cu_seqlens: Tensor, mode: str = "mean", normalize: bool = False) -> Tensor:
    """Sentence embeddings of packed sequences: (T, H) + (batch + 1,) cu_seqlens -> (batch, H).

    ``mode`` ``"mean"`` (average of each sequence's rows) or ``"cls"`` (its first row), then, with
    ``normalize``, L2 normalisation; one op, forward and backward. Empty sequences give zeros.
    """
    if mode not in reference.POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {reference.POOLING_MODES}, got {mode!r}")
    if hidden.dim() != 2 or cu_seqlens.dim() != 1:
        raise ValueError(f"pooling takes (tokens, hidden) rows and 1-D cu_seqlens, got {tuple(hidden.shape)} "
                         f"and {tuple(cu_seqlens.shape)}")
    _, fn = implementation("pooling", hidden, mode=mode, normalize=normalize)
    return fn(hidden, cu_seqlens, mode, normalize)


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
    "pooling",
    "reference",
    "use_backend",
]

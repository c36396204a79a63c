"""The CPU backend: the C++ ops of ``bertfast/_C.so`` (``csrc/``), float32 and bfloat16.

The library registers the ops' schemas (``TORCH_LIBRARY(bertfast, m)``), their CPU kernels and the
autograd of the differentiable ones, all in C++, so an eager call costs what an ATen op costs; here they
get their fake (shape-only) implementations, which ``torch.compile`` traces:

* ``bertfast::bias_gelu`` (+ ``bias_gelu_backward``): exact-erf GELU of x + bias.
* ``bertfast::dropout``: dropout whose mask is never stored: element (row, col) is kept when a
  counter-based hash of (seed, row, col) clears the threshold (``csrc/dropout.cpp``), so backward (the same
  op on the gradient) regenerates it, and drawing it costs a fraction of ``torch.bernoulli_``'s time (the
  largest single cost of a small model's training step on a CPU). The seed follows the policy of
  ``bertfast.ops``. ``bertfast::dropout_bits`` gives its hashes (for tests).
* ``bertfast::rotary``: rotary embeddings on the q and k of packed qkv (backward: the same op turning
  the other way); ``bertfast::geglu`` (+ ``geglu_backward``): the gated GELU of ModernBERT's MLP.
* ``bertfast::pooling`` (+ ``pooling_forward`` / ``pooling_backward``): mean or first-row pooling of
  packed sequences, optionally L2-normalised, in one pass each way (sentence embeddings).
* ``bertfast::attention`` (+ ``attention_forward`` / ``attention_backward``): attention of the packed
  sequences themselves, parallel over (sequence, head), with no padded batch, optionally with MPNet's
  relative-position bias and dropout on the probabilities; its autograd saves the output and the
  log-sum-exp (not the output), and backward recomputes the probabilities (``csrc/attention.cpp`` for calls that record
  nothing and have no dropout, ``csrc/attention_train.cpp`` otherwise).
* Inference only (forward kernel, no autograd): ``bertfast::add_layernorm``, LayerNorm(x + bias +
  residual) in one pass (``csrc/add_layernorm.cpp``); ``bertfast::linear`` and ``bertfast::encoder_layer``,
  a dense layer and a whole encoder layer on weights prepacked for oneDNN (``csrc/linear.cpp``;
  ``bertfast.prepacked`` packs the weights and calls them). These two have no fake implementation: the
  packed weights are opaque oneDNN tensors, which neither ``torch.compile`` nor ``opcheck`` can trace, and
  compiled graphs take the module path (Inductor packs their weights itself).

Bias + dropout + residual + LayerNorm runs its kernel for a call that needs no gradient and has no
dropout (:func:`inference_call`: ``eval()`` under ``no_grad`` / ``inference_mode``); training calls get the
reference computations with the native dropout in place of ``F.dropout``, as do the embeddings. The
kernels compute in float32; bfloat16 tensors are converted row by row as they are loaded and stored
(AVX512-BF16's conversion where the CPU has it).

The library is tied to the torch it was built with (``pip install`` builds it against the installed torch).
Importing this module without it built raises ``ModuleNotFoundError`` for ``bertfast._C``: then there is
no native backend and the reference runs.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from bertfast.common import dropout as policy
from bertfast.common import relative_position
from bertfast.ops import reference


def _load_library() -> None:
    # The editable and the regular install both map bertfast._C to the built _C.so (a torch library, not a
    # Python module: it has no PyInit, so it is loaded, not imported).
    spec = importlib.util.find_spec("bertfast._C")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("bertfast's native library (bertfast/_C.so) is not built", name="bertfast._C")
    library = Path(spec.origin)
    built_for = library.with_name("_C.torch-version").read_text().strip()
    if built_for != torch.__version__:
        warnings.warn(f"bertfast's native CPU ops were built for torch {built_for}, not for this torch "
                      f"{torch.__version__}: they are off (the reference runs) until bertfast is reinstalled "
                      "(pip install --no-build-isolation ...)", RuntimeWarning, stacklevel=3)
        raise ModuleNotFoundError("bertfast/_C.so is built for another torch", name="bertfast._C")
    torch.ops.load_library(str(library))


_load_library()
_ops = torch.ops.bertfast
_bias_gelu_op = _ops.bias_gelu.default
_bias_gelu_backward_op = _ops.bias_gelu_backward.default
_dropout_op = _ops.dropout.default
_dropout_bits_op = _ops.dropout_bits.default
_attention_op = _ops.attention.default
_attention_forward_op = _ops.attention_forward.default
_attention_backward_op = _ops.attention_backward.default
_add_layernorm_op = _ops.add_layernorm.default
_rotary_op = _ops.rotary.default
_geglu_op = _ops.geglu.default
_geglu_backward_op = _ops.geglu_backward.default
_pooling_op = _ops.pooling.default
DTYPES = (torch.float32, torch.bfloat16)


@torch.library.register_fake("bertfast::bias_gelu")
def _bias_gelu_fake(x: Tensor, bias: Tensor | None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bertfast::bias_gelu_backward")
def _bias_gelu_backward_fake(dy: Tensor, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    dtype = torch.float32 if bias is None else bias.dtype
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[-1], dtype=dtype)


@torch.library.register_fake("bertfast::dropout")
def _dropout_fake(x: Tensor, seed: Tensor, p: float, rows: Tensor | None) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bertfast::dropout_bits")
def _dropout_bits_fake(seed: Tensor, rows: Tensor, n_cols: int) -> Tensor:
    return rows.new_empty(rows.shape[0], n_cols, dtype=torch.int64)


@torch.library.register_fake("bertfast::attention")
def _attention_fake(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, bias: Tensor | None = None,
                    seed: Tensor | None = None, dropout_p: float = 0.0, window: int | None = None,
                    columns: Tensor | None = None, pos_key: Tensor | None = None, pos_query: Tensor | None = None,
                    pos_index: Tensor | None = None) -> Tensor:
    return qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3])


@torch.library.register_fake("bertfast::attention_forward")
def _attention_forward_fake(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
                            bias: Tensor | None = None, seed: Tensor | None = None, dropout_p: float = 0.0,
                            window: int | None = None, columns: Tensor | None = None, pos_key: Tensor | None = None,
                            pos_query: Tensor | None = None, pos_index: Tensor | None = None
                            ) -> tuple[Tensor, Tensor]:
    out = qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3])
    return out, qkv.new_empty(qkv.shape[0], qkv.shape[2], dtype=torch.float32)


@torch.library.register_fake("bertfast::attention_backward")
def _attention_backward_fake(dout: Tensor, qkv: Tensor, lse: Tensor, cu_seqlens: Tensor,
                             max_seqlen: int, scale: float, bias: Tensor | None = None, seed: Tensor | None = None,
                             dropout_p: float = 0.0, window: int | None = None, columns: Tensor | None = None,
                             pos_key: Tensor | None = None, pos_query: Tensor | None = None,
                             pos_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    def like(t: Tensor | None) -> Tensor:
        return torch.empty_like(t) if t is not None else qkv.new_empty(0, dtype=torch.float32)

    return torch.empty_like(qkv, memory_format=torch.contiguous_format), like(bias), like(pos_key), like(pos_query)


@torch.library.register_fake("bertfast::rotary")
def _rotary_fake(qkv: Tensor, positions: Tensor, inv_freq: Tensor, inverse: bool = False) -> Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


@torch.library.register_fake("bertfast::geglu")
def _geglu_fake(x: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.register_fake("bertfast::geglu_backward")
def _geglu_backward_fake(dy: Tensor, x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bertfast::add_layernorm")
def _add_layernorm_fake(x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                        eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("bertfast::pooling")
def _pooling_fake(hidden: Tensor, cu_seqlens: Tensor, mode: str, normalize: bool) -> Tensor:
    return hidden.new_empty(cu_seqlens.shape[0] - 1, hidden.shape[1])


@torch.library.register_fake("bertfast::pooling_forward")
def _pooling_forward_fake(hidden: Tensor, cu_seqlens: Tensor, mode: str, normalize: bool) -> tuple[Tensor, Tensor]:
    batch, n = cu_seqlens.shape[0] - 1, hidden.shape[1]
    return hidden.new_empty(batch, n), hidden.new_empty((batch, n) if normalize else (0,), dtype=torch.float32)


@torch.library.register_fake("bertfast::pooling_backward")
def _pooling_backward_fake(dy: Tensor, pooled: Tensor, cu_seqlens: Tensor, rows: int, mode: str,
                           normalize: bool) -> Tensor:
    return dy.new_empty(rows, dy.shape[1])


def pooling_supports(*tensors: Tensor | None, mode: str = "mean", normalize: bool = False) -> bool:
    """CPU activations, float32 or bfloat16."""
    return supports(*tensors[:1])


def pooling(hidden: Tensor, cu_seqlens: Tensor, mode: str = "mean", normalize: bool = False) -> Tensor:
    """Mean or first-row vectors of each packed sequence, L2-normalised with ``normalize`` (``csrc/pooling.cpp``)."""
    return _pooling_op(hidden, cu_seqlens, mode, normalize)


def supports(*tensors: Tensor | None, approximate: str = "none") -> bool:
    """CPU tensors of one dtype, float32 or bfloat16 (and the exact GELU)."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype if present else torch.float32
    return approximate == "none" and dtype in DTYPES and all(t.dtype == dtype and t.device.type == "cpu"
                                                             for t in present)


def records_autograd(*tensors: Tensor | None) -> bool:
    """Whether a call on these tensors would be recorded for backward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def inference_call(dropout_p: float, training: bool, *tensors: Tensor | None) -> bool:
    """A call the forward-only kernels serve: no dropout and nothing recorded for backward."""
    return (not training or dropout_p == 0.0) and not records_autograd(*tensors)


def bias_gelu(x: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """gelu(x + bias), exact GELU."""
    return _bias_gelu_op(x, bias)


def rotary(qkv: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary embeddings on q and k of packed qkv, v unchanged (``csrc/rotary.cpp``); backward turns dy back."""
    return _rotary_op(qkv, positions, inv_freq)


def supports_rotary(qkv: Tensor, inv_freq: Tensor | None = None) -> bool:
    """:func:`supports` for qkv; frequencies of any floating dtype on the CPU (they are read in float32)."""
    return supports(qkv) and (inv_freq is None or (inv_freq.device.type == "cpu" and inv_freq.is_floating_point()))


def geglu(x: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x[:, :N]) * x[:, N:], exact GELU, forward and backward in one pass each (``csrc/geglu.cpp``)."""
    return _geglu_op(x)


def dropout_bits(seed: Tensor, rows: Tensor, n_cols: int) -> Tensor:
    """(len(rows), n_cols) int64: the 32-bit hashes that the dropout kernel shifts and compares."""
    return _dropout_bits_op(seed, rows, n_cols)


def dropout(x: Tensor, p: float, training: bool, seed: Tensor | None = None) -> Tensor:
    """``F.dropout(x, p, training)`` with the shared counter-hash mask."""
    policy.check_probability(p)
    if not training or p == 0.0:
        return x
    return _dropout_op(x, policy.draw_seed(x.device) if seed is None else seed, p, None)


def embeddings(
    input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor, word_weight: Tensor,
    position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
    dropout_p: float, training: bool, inputs_embeds: Tensor | None = None, padding_idx: int | None = None,
) -> Tensor:
    """The reference embeddings, with the native dropout."""
    x = reference.embeddings(input_ids, position_ids, token_type_ids, word_weight, position_weight, type_weight,
                             ln_weight, ln_bias, eps, 0.0, False, inputs_embeds=inputs_embeds,
                             padding_idx=padding_idx)
    return dropout(x, dropout_p, training)


def bias_dropout_add_layernorm(
    x: Tensor, bias: Tensor | None, residual: Tensor, ln_weight: Tensor, ln_bias: Tensor,
    eps: float, dropout_p: float, training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual): one fused pass in inference, else with the native dropout."""
    if inference_call(dropout_p, training, x, bias, residual, ln_weight, ln_bias):
        return _add_layernorm_op(x, bias, residual, ln_weight, ln_bias, eps)
    h = dropout(x if bias is None else x + bias, dropout_p, training) + residual
    return F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)


def supports_attention(qkv: Tensor, bias_table: Tensor | None = None, window: int | None = None,
                       columns: Tensor | None = None, pos_index: Tensor | None = None) -> bool:
    """:func:`supports` for qkv; a bias table of any floating dtype on the CPU (it is read in float32); any
    window, columns and disentangled terms."""
    if bias_table is not None and (bias_table.device.type != "cpu" or not bias_table.is_floating_point()):
        return False
    return supports(qkv)


def attention(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    training: bool = False, softmax_scale: float | None = None, bias_table: Tensor | None = None,
    num_buckets: int = 32, max_distance: int = 128, window: int | None = None, columns: Tensor | None = None,
    pos_key: Tensor | None = None, pos_query: Tensor | None = None, pos_index: Tensor | None = None,
) -> Tensor:
    """The packed kernels, in inference and in training: each sequence costs its own length times the keys a
    query sees (all of its sequence, or the ``window``: |query - key| <= window). The
    relative-position bias is laid out by distance (gathered once per call by the shared bucketing, which
    autograd takes back to the table); dropout on the probabilities uses the shared mask, with a seed drawn
    by the policy of ``bertfast.ops``. DeBERTa's position tables are read in float32 (their gradients come
    back in their dtype)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(qkv.shape[-1])
    bias = None
    if bias_table is not None:
        bias = relative_position.distance_bias(bias_table, max_seqlen, num_buckets, max_distance)
        bias = bias.to(torch.float32).contiguous()
    p = dropout_p if training else 0.0
    seed = policy.draw_seed(qkv.device) if p > 0.0 else None
    tables = [None if t is None else t.to(torch.float32).contiguous() for t in (pos_key, pos_query)]
    return _attention_op(qkv, cu_seqlens, max_seqlen, scale, bias, seed, p, window, columns, *tables, pos_index)

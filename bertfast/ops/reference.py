"""Plain-PyTorch references of every hot op.

These define what each op computes. The fused kernels (``bertfast.kernels``, the C++ ops of
``bertfast.ops.native``) must match them; tests compare against them, and on machines
without a faster backend they are what runs.

Every op works on packed tokens: activations are ``(tokens, hidden)`` with the
padding already removed (see ``bertfast.padding``). Dropout follows the policy of
``bertfast.ops`` with the shared mask of ``bertfast.common.dropout``, so for one seed
the reference drops exactly what the kernels drop.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bertfast.common import IGNORE_INDEX, dropout
from bertfast.common.relative_position import check_bias_table, relative_position_bucket
from bertfast.common.relative_position import distance_bias as distance_bias  # re-exported: the reference's


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
    """dropout(LayerNorm(word[ids] + position[pos] + type[tt])) on packed ids of shape (T,).

    With ``inputs_embeds`` (T, H) the word lookup is replaced by those vectors.
    The word row ``padding_idx`` gets no gradient (as ``nn.Embedding(padding_idx=...)``).
    """
    if inputs_embeds is not None:
        words = inputs_embeds
    else:
        words = F.embedding(input_ids, word_weight, padding_idx=padding_idx)
    x = words + F.embedding(position_ids, position_weight) + F.embedding(token_type_ids, type_weight)
    x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return _dropout(x, dropout_p, training)


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with a seed drawn from x's device generator and the shared (seed, row, column) mask."""
    dropout.check_probability(p)
    if not training or p == 0.0:
        return x
    return dropout.apply(x, dropout.draw_seed(x.device), p)


def _add_bias(x: Tensor, bias: Tensor | None) -> Tensor:
    return x if bias is None else x + bias


def bias_gelu(x: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """gelu(x + bias): the feed-forward intermediate activation (exact erf GELU by default).

    ``bias`` None (here and in the other ops): the Linear before the op has already added its own.
    """
    return F.gelu(_add_bias(x, bias), approximate=approximate)


def bias_dropout_add_layernorm(
    x: Tensor,
    bias: Tensor | None,
    residual: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    dropout_p: float,
    training: bool,
) -> Tensor:
    """LayerNorm(dropout(x + bias) + residual): the end of the attention and feed-forward blocks."""
    h = _dropout(_add_bias(x, bias), dropout_p, training) + residual
    return F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)


def bias_gelu_layernorm(
    x: Tensor, bias: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float, approximate: str = "none"
) -> Tensor:
    """LayerNorm(gelu(x + bias)): the MLM prediction-head transform after its dense layer."""
    h = F.gelu(_add_bias(x, bias), approximate=approximate)
    return F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, eps)


def attention(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    training: bool = False,
    softmax_scale: float | None = None,
    bias_table: Tensor | None = None,
    num_buckets: int = 32,
    max_distance: int = 128,
    window: int | None = None,
    columns: Tensor | None = None,
    pos_key: Tensor | None = None,
    pos_query: Tensor | None = None,
    pos_index: Tensor | None = None,
) -> Tensor:
    """Bidirectional attention on packed sequences.

    qkv: (T, 3, heads, head_dim); cu_seqlens: (batch + 1,) int32 offsets of each
    sequence in T; max_seqlen: at least the longest sequence; returns (T, heads, head_dim).
    Each sequence attends only to itself. Runs SDPA on a padded (batch, heads, max_seqlen,
    head_dim) view. Nothing branches on T or on tensor values, so that it traces with a
    data-dependent T.

    ``bias_table`` (num_buckets, heads): MPNet's relative-position bias, added to the scaled scores:
    S[q, k] = scale * q . k + bias_table[relative_position_bucket(k - q), head], positions counted
    inside each sequence.

    ``window``: sliding-window (local) attention, query i sees key j of its sequence only where
    |i - j| <= window (ModernBERT's local layers: ``local_attention // 2``); None: every key.

    ``columns`` (T,): each token's column in its padded row; the bias's and the window's distances are
    then differences of columns instead of positions in the sequence (a mask with holes).

    ``pos_key`` / ``pos_query`` (positions, heads, head_dim) and ``pos_index`` (2 * max_seqlen - 1,): DeBERTa's
    disentangled attention, S[q, k] += scale * (q . pos_key[c] + k . pos_query[c]) with c = pos_index[k - q +
    max_seqlen - 1] (``relative_position.deberta_position_index``); either table may be None.
    """
    if bias_table is not None:
        check_bias_table(bias_table, qkv.shape[2], num_buckets, max_distance)
    relative = (pos_key, pos_query, pos_index)
    if training and dropout_p > 0.0:
        seed = dropout.draw_seed(qkv.device)
        return attention_with_dropout(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                      lambda probs, rows: dropout.apply(probs, seed, dropout_p, rows),
                                      bias_table, num_buckets, max_distance, window, columns, *relative)
    view = PaddedHeads(qkv, cu_seqlens, max_seqlen)
    distance = view.distance(columns)
    mask = view.key_mask[:, None, None, :]
    if window is not None:
        mask = mask & _windowed(view.key_mask, distance, window)
    bias = _scores_bias(view, distance, max_seqlen, _scale_of(qkv, softmax_scale), bias_table, num_buckets,
                        max_distance, *relative)
    if bias is not None:
        mask = bias.to(qkv.dtype).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(view.q, view.k, view.v, attn_mask=mask, scale=softmax_scale)
    return view.pack(out)


def _scale_of(qkv: Tensor, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(qkv.shape[-1])


def _scores_bias(
    view: PaddedHeads, distance: Tensor, max_seqlen: int, scale: float, bias_table: Tensor | None,
    num_buckets: int, max_distance: int, pos_key: Tensor | None, pos_query: Tensor | None, pos_index: Tensor | None,
) -> Tensor | None:
    """What is added to the scaled scores, (batch, heads, S, S): MPNet's bias and DeBERTa's disentangled terms,
    or None when the call has neither."""
    bias = None
    if bias_table is not None:
        bias = _score_bias(bias_table, distance, num_buckets, max_distance)
    if pos_index is not None:
        terms = _disentangled_terms(view, distance, max_seqlen, scale, pos_key, pos_query, pos_index)
        bias = terms if bias is None else bias + terms
    return bias


def _disentangled_terms(view: PaddedHeads, distance: Tensor, max_seqlen: int, scale: float, pos_key: Tensor | None,
                        pos_query: Tensor | None, pos_index: Tensor) -> Tensor:
    """scale * (q_i . pos_key[c] + k_j . pos_query[c]) at [:, :, i, j], c the position row of their distance."""
    if pos_key is None and pos_query is None:
        raise ValueError("pos_index needs pos_key or pos_query (the disentangled terms)")
    batch, heads = view.q.shape[:2]
    # Padded slots' distances may leave the table; their scores are masked or never packed.
    rows = pos_index[(distance + max_seqlen - 1).clamp(0, pos_index.numel() - 1)]  # (batch or 1, S, S)
    rows = rows.expand(batch, -1, -1)[:, None].expand(-1, heads, -1, -1)
    terms = 0.0
    if pos_key is not None:  # content -> position: q_i . Kr[c(i, j)]
        terms = terms + torch.gather(view.q @ pos_key.permute(1, 2, 0).to(view.q.dtype), -1, rows)
    if pos_query is not None:  # position -> content: k_j . Qr[c(i, j)]
        p2c = view.k @ pos_query.permute(1, 2, 0).to(view.k.dtype)  # (batch, heads, S_key, positions)
        terms = terms + torch.gather(p2c, -1, rows.transpose(-1, -2)).transpose(-1, -2)
    return terms * scale


def _score_bias(bias_table: Tensor, distance: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """(batch, heads, S, S): the bias of (query i, key j) at [:, :, i, j], from ``distance`` (batch, S, S) of
    key - query."""
    buckets = relative_position_bucket(distance, num_buckets, max_distance)
    return bias_table[buckets].movedim(-1, 1)


def attention_with_dropout(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float, softmax_scale: float | None,
    apply_dropout: Callable[[Tensor, Tensor], Tensor], bias_table: Tensor | None = None,
    num_buckets: int = 32, max_distance: int = 128, window: int | None = None, columns: Tensor | None = None,
    pos_key: Tensor | None = None, pos_query: Tensor | None = None, pos_index: Tensor | None = None,
) -> Tensor:
    """softmax(scale Q K^T [+ bias]) with ``apply_dropout(probs, rows)`` on the probabilities, times V.

    ``probs`` is (batch, heads, max_seqlen, max_seqlen); ``rows`` gives each of its (query) rows the
    row of the shared dropout mask: (packed query token) * heads + head, so that the mask does not
    depend on ``max_seqlen`` (padded query rows get some row; they are never packed back).
    """
    view = PaddedHeads(qkv, cu_seqlens, max_seqlen)
    heads = qkv.shape[2]
    scale = _scale_of(qkv, softmax_scale)
    scores = (view.q @ view.k.transpose(-1, -2)) * scale
    distance = view.distance(columns)
    bias = _scores_bias(view, distance, max_seqlen, scale, bias_table, num_buckets, max_distance, pos_key,
                        pos_query, pos_index)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    visible = view.key_mask[:, None, None, :]
    if window is not None:
        visible = visible & _windowed(view.key_mask, distance, window)
    scores = scores.masked_fill(~visible, float("-inf"))
    starts = cu_seqlens[:-1].long()[:, None, None]
    query = torch.arange(max_seqlen, device=qkv.device)[None, None, :]
    head = torch.arange(heads, device=qkv.device)[None, :, None]
    rows = ((starts + query) * heads + head).reshape(-1)
    probs = apply_dropout(scores.softmax(dim=-1), rows)
    return view.pack(probs @ view.v)


class PaddedHeads:
    """Packed qkv (T, 3, heads, head_dim) as padded q, k, v of shape (batch, heads, max_seqlen, head_dim)."""

    def __init__(self, qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> None:
        total, _, heads, head_dim = qkv.shape
        batch = cu_seqlens.numel() - 1
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq_of_token = torch.repeat_interleave(torch.arange(batch, device=qkv.device), lengths, output_size=total)
        pos_of_token = torch.arange(total, device=qkv.device) - cu_seqlens[:-1].long()[seq_of_token]
        self.flat_index = seq_of_token * max_seqlen + pos_of_token
        self.shape = (batch, max_seqlen, heads, head_dim)

        padded = qkv.new_zeros(batch * max_seqlen, 3, heads, head_dim)
        padded = padded.index_copy(0, self.flat_index, qkv).view(batch, max_seqlen, 3, heads, head_dim)
        self.q, self.k, self.v = padded.permute(2, 0, 3, 1, 4).unbind(0)
        key_mask = torch.arange(max_seqlen, device=qkv.device)[None, :] < lengths[:, None]
        # An empty sequence has no queries; letting its (unused) padded rows see every key keeps them finite.
        self.key_mask = key_mask | (lengths == 0)[:, None]  # (batch, max_seqlen), True = a real key

    def distance(self, columns: Tensor | None) -> Tensor:
        """(batch or 1, max_seqlen, max_seqlen) key - query distances: of positions in the sequence, or of the
        tokens' ``columns`` (padded slots get column 0; their rows and keys are masked or never packed)."""
        batch, max_seqlen = self.shape[:2]
        if columns is None:
            places = torch.arange(max_seqlen, device=self.key_mask.device)[None, :]
        else:
            places = columns.new_zeros(batch * max_seqlen).index_copy(0, self.flat_index, columns)
            places = places.view(batch, max_seqlen)
        return places[:, None, :] - places[:, :, None]

    def pack(self, out: Tensor) -> Tensor:
        """(batch, heads, max_seqlen, head_dim) -> (T, heads, head_dim): the rows of the real tokens."""
        batch, max_seqlen, heads, head_dim = self.shape
        out = out.transpose(1, 2).reshape(batch * max_seqlen, heads, head_dim)
        return out.index_select(0, self.flat_index)


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``x @ weight.T + bias`` against ``labels``, plus the number of correct argmaxes.

    x: (M, H) rows (only the masked positions, for MLM); weight: (V, H); labels: (M,).
    ``mean`` averages over rows whose label is not ``ignore_index``; with none it
    is 0 (not NaN). The reference builds all (M, V) logits at once; ``chunk_bytes``
    only matters to the fused backends.
    """
    del chunk_bytes
    logits = F.linear(x, weight, bias).float()
    loss = F.cross_entropy(
        logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    valid = labels != ignore_index
    with torch.no_grad():
        n_correct = ((logits.argmax(-1) == labels) & valid).sum()
    if reduction == "none":
        return loss, n_correct
    total = loss.sum()
    if reduction == "sum":
        return total, n_correct
    if reduction == "mean":
        return total / valid.sum().clamp(min=1), n_correct
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


POOLING_MODES = ("mean", "cls")
NORMALIZE_EPS = 1e-12  # F.normalize's: a vector shorter than this is divided by it instead of its norm


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the half types (sums and norms), the input's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def pooling(hidden: Tensor, cu_seqlens: Tensor, mode: str = "mean", normalize: bool = False) -> Tensor:
    """One vector per packed sequence: (T, H) rows + (batch + 1,) ``cu_seqlens`` -> (batch, H).

    ``mean``: the average of the sequence's rows; ``cls``: its first row. An empty sequence gives
    zeros (as sentence-transformers' masked mean and first-token pooling give it). ``normalize``
    then divides each vector by max(its L2 norm, 1e-12), as ``F.normalize``. Sums and norms are in
    fp32 for half inputs; the result has ``hidden``'s dtype. ``cu_seqlens`` starts at 0 and ends at T.
    """
    batch, total = cu_seqlens.numel() - 1, hidden.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    acc = accumulation_dtype(hidden.dtype)
    if mode == "mean":
        seq_of_row = torch.repeat_interleave(torch.arange(batch, device=hidden.device), lengths, output_size=total)
        sums = hidden.new_zeros(batch, hidden.shape[1], dtype=acc).index_add(0, seq_of_row, hidden.to(acc))
        pooled = sums / lengths.clamp(min=1).to(acc)[:, None]
    elif mode == "cls":
        first = torch.where(lengths > 0, cu_seqlens[:-1].long(), total)  # row T: the zero row appended below
        pooled = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[1])]).index_select(0, first).to(acc)
    else:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}")
    if normalize:
        pooled = F.normalize(pooled, p=2.0, dim=-1, eps=NORMALIZE_EPS)
    return pooled.to(hidden.dtype)


def rotary(qkv: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotary position embeddings on the queries and keys of packed qkv (T, 3, heads, head_dim).

    ``positions`` (T,): each token's position; ``inv_freq`` (head_dim / 2,): the rotation frequencies.
    transformers' (Llama/ModernBERT) convention: the angles are (pos * inv_freq) twice over, cos and sin
    rounded to qkv's dtype, and q * cos + rotate_half(q) * sin computed in fp32. v is returned unchanged.
    """
    freqs = positions[:, None].float() * inv_freq.float()[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    cos, sin = angles.cos().to(qkv.dtype).float(), angles.sin().to(qkv.dtype).float()
    qk = qkv[:, :2].float()
    half = qk.shape[-1] // 2
    rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
    return torch.cat(((qk * cos + rotated * sin).to(qkv.dtype), qkv[:, 2:]), dim=1)


def geglu(x: Tensor, approximate: str = "none") -> Tensor:
    """Gated GELU: (rows, 2 N) -> (rows, N), gelu(x[:, :N]) * x[:, N:]."""
    value, gate = x.chunk(2, dim=-1)
    return F.gelu(value, approximate=approximate) * gate


def _windowed(key_mask: Tensor, distance: Tensor, window: int) -> Tensor:
    """(batch, 1, max_seqlen, max_seqlen): the window (|distance| <= window) for real queries; padded query rows
    (never packed back) see every key, so that no row of the softmax is empty."""
    return (distance.abs() <= window)[:, None] | ~key_mask[:, None, :, None]

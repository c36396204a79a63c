"""MPNet's relative-position attention bias: the bucketing, and the table laid out by key - query distance.

Shared by the reference (which applies it per (query, key) pair) and the kernels (which read the
per-distance row that :func:`distance_bias` gathers, so that every backend uses these very buckets).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_position_bucket(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """MPNet's bucket of each (key position - query position): exact below ``num_buckets // 4``, log-spaced
    up to ``max_distance``, one half of the buckets for keys after the query and one for the rest.

    The same computation as transformers' ``MPNetEncoder.relative_position_bucket`` (same float ops in the
    same order, so the same buckets); the kernels take its result as a per-distance lookup, never their own.
    """
    check_bucketing(num_buckets, max_distance)
    ret = 0
    n = -relative_position
    num_buckets //= 2
    ret += (n < 0).to(torch.long) * num_buckets
    n = torch.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def check_bucketing(num_buckets: int, max_distance: int) -> None:
    if num_buckets < 4:
        raise ValueError(f"num_buckets must be at least 4 (exact and log-spaced buckets each way), got {num_buckets}")
    if max_distance <= num_buckets // 4:
        raise ValueError(f"max_distance must exceed num_buckets // 4 = {num_buckets // 4}, got {max_distance}")


def check_bias_table(bias_table: Tensor, heads: int, num_buckets: int, max_distance: int) -> None:
    check_bucketing(num_buckets, max_distance)
    if bias_table.shape != (num_buckets, heads):
        raise ValueError(f"bias_table must be (num_buckets, heads) = ({num_buckets}, {heads}), "
                         f"got {tuple(bias_table.shape)}")


def distance_bias(bias_table: Tensor, max_seqlen: int, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """(heads, 2 * max_seqlen - 1): the bias of each key - query distance d at column d + max_seqlen - 1.

    All that attention within sequences of at most ``max_seqlen`` tokens needs of the table: a gather
    (differentiable: its backward adds each distance's gradient into its bucket's row). ``max_seqlen`` 0
    (no tokens) gives the one column of distance 0.
    """
    max_seqlen = max(max_seqlen, 1)
    distances = torch.arange(1 - max_seqlen, max_seqlen, device=bias_table.device)
    return bias_table[relative_position_bucket(distances, num_buckets, max_distance)].t()


def deberta_log_bucket(relative_position: Tensor, bucket_size: int, max_position: int) -> Tensor:
    """DeBERTa's bucket of each (query position - key position): exact within ``bucket_size // 2``, log-spaced
    beyond, up to ``max_position``. The same float ops as transformers' ``make_log_bucket_position`` (so the
    same buckets); the kernels take its result as a per-distance lookup (:func:`deberta_position_index`)."""
    sign = torch.sign(relative_position)
    mid = bucket_size // 2
    abs_pos = torch.where((relative_position < mid) & (relative_position > -mid),
                          torch.tensor(mid - 1).type_as(relative_position), torch.abs(relative_position))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_position.type_as(log_pos), log_pos * sign).to(torch.long)


def deberta_position_index(max_seqlen: int, position_buckets: int, max_relative_positions: int, span: int,
                           device: torch.device | str = "cpu") -> Tensor:
    """(2 * max_seqlen - 1,) int64: the row of DeBERTa's relative-position tables (``2 * span`` rows) that the
    scores of a query and a key at key - query distance d read, at d + max_seqlen - 1: the (bucketed, when
    ``position_buckets`` and ``max_relative_positions`` are both positive) query - key position plus ``span``,
    clamped to the table, as transformers' ``disentangled_attention_bias`` indexes both of its terms."""
    max_seqlen = max(max_seqlen, 1)
    relative = -torch.arange(1 - max_seqlen, max_seqlen, device=device)  # query - key = -(key - query)
    if position_buckets > 0 and max_relative_positions > 0:
        relative = deberta_log_bucket(relative, position_buckets, max_relative_positions)
    return torch.clamp(relative + span, 0, 2 * span - 1)

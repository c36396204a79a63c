"""Fused attention for packed variable-length BERT sequences (flash-attention style).

Math, per sequence b and head h, with queries/keys/values of that sequence only
(``cu_seqlens`` delimits the sequences among the packed tokens; no padding is
read or computed):

    S = scale * Q K^T [+ B]           P = softmax(S) (over the keys)
    O = dropout(P) V                  lse = log(sum_j exp(S_ij))   (kept in fp32, layout (heads, T))

The softmax runs in base 2: scores are multiplied by ``scale * log2(e)`` once and
exponentiated with ``exp2``. Dropout keeps P_ij with probability 1 - p and scales
it by 1 / (1 - p); the keep decision is the shared counter hash of (seed, row
(packed query token) * heads + head, column = key position in the sequence), the
rule of every backend (``bertfast.common.dropout``), so it is regenerated in backward
and never stored (``dropout_keep_mask`` reproduces it).

Backward (``delta = rowsum(dO * O)``, computed by a preprocess kernel):

    dV = dropout(P)^T dO      dP = dropout'(dO V^T)      dS = P * (dP - delta)
    dQ = scale * dS K         dK = scale * dS^T Q

With MPNet's relative-position bias, B[i, j] = bias[h, j - i] (the table gathered once a call per key -
query distance by the shared bucketing, ``bertfast.common.relative_position``), and backward also gives
dbias[h, d] = sum of dS over the pairs at distance d (``_add_diagonal_sums``), whence the table's gradient.

One program per (key block, sequence, head) accumulates dK, dV over the query
blocks. dQ is finished in one of three ways (``DQ_*`` below):

* the key block covers the whole sequence (max_seqlen <= BLOCK_N1, e.g. BERT at
  128 tokens): each dQ block is complete inside the loop and is stored directly;
* deterministic (default): the same program then computes the dQ rows of its
  query block by iterating over key blocks, recomputing S and dP;
* atomic (``deterministic=False`` or ``BERTFAST_ATTENTION_DETERMINISTIC=0``):
  dQ partials are atomically added to an fp32 buffer and cast at the end.

Why deterministic is the default: on paper it costs 2 extra MMAs per tile pair
(7 instead of 5), e.g. 26 GFLOP (~30-60 us on an H100) for 16k tokens of 512,
12 heads, head_dim 64; the atomic path instead zero-fills an fp32 dQ, issues
(key blocks) x |dQ| fp32 read-modify-writes (4 x 50 MB there) and casts it, a
comparable ~300 MB of traffic (~100 us at 3.35 TB/s), and its sums depend on
scheduling. ``torch.use_deterministic_algorithms(True)`` always forces it.

Runs on CUDA for fp16/bf16 (fp32 accumulation) and, under ``TRITON_INTERPRET=1``,
on fp32/fp16 CPU tensors. Head dims up to 128 (32/64/128 tuned). Everything else
(fp32 on a GPU, larger head dims, CPU without the interpreter) uses the reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.common import dropout, relative_position
from bertfast.common.library import TRITON_INTERPRETED, kernel_op, wrap_triton

from .aot import AotSpec, meta, record, spec
from .layernorm_common import DTYPES, dropout_keep_keyed, dropout_key

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128
# Read once: BERTFAST_ATTENTION_DETERMINISTIC=0 lets backward add dQ with atomics (see above).
DETERMINISTIC_DEFAULT = os.environ.get("BERTFAST_ATTENTION_DETERMINISTIC", "1").strip().lower() not in (
    "0", "false", "no")

# How the backward kernel finishes dQ.
DQ_STORE = 0  # one key block spans the sequence: each dQ block is complete, store it
DQ_ATOMIC = 1  # atomic fp32 adds of per-key-block partials
DQ_RECOMPUTE = 2  # a second loop over key blocks per query block (deterministic)
_DQ_STORE = tl.constexpr(DQ_STORE)  # the kernels can only read constexpr globals
_DQ_RECOMPUTE = tl.constexpr(DQ_RECOMPUTE)


@triton.jit
def _dropout_keep(key, seq_start, h, n_heads, q_idx, k_idx, drop_threshold):
    """True where probability (query q_idx, key k_idx) of head h of the sequence at seq_start survives.

    ``key``: ``dropout_key(seed)``. q_idx and k_idx (positions in the sequence) broadcast against each
    other. The element is row (seq_start + q) * heads + h, column k of the shared dropout rule.
    """
    k0, k1 = key
    return dropout_keep_keyed(k0, k1, (seq_start + q_idx) * n_heads + h, k_idx, drop_threshold)


@triton.jit
def _distance_bias(Bias, q_idx, k_idx, mask):
    """The bias of each (query q_idx, key k_idx) pair (positions in the sequence, broadcasting), in the
    base-2 units of the scores: Bias[k - q] * log2(e), with ``Bias`` pointing at distance 0."""
    return tl.load(Bias + (k_idx - q_idx), mask=mask, other=0.0) * 1.4426950408889634


@triton.jit
def _add_diagonal_sums(DBias, dsT, n_dist, offset, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """DBias[offset + a - b] += dsT[a, b] summed over the tile's (a, b) with the same a - b; entries whose
    index falls outside [0, n_dist) must hold zeros (they are pairs outside the sequence).

    A gather skews the tile (row a' of column b takes row (a' + b) mod BLOCK_N), which turns the diagonals
    into rows: those that did not wrap hold distance a', the wrapped ones a' - BLOCK_N (BLOCK_M <= BLOCK_N).
    Read-modify-write by one program only, behind a barrier: deterministic, no atomics.
    """
    a = tl.arange(0, BLOCK_N)[:, None]
    b = tl.arange(0, BLOCK_M)[None, :]
    shifted = a + b
    wrapped = shifted >= BLOCK_N
    skewed = tl.gather(dsT, tl.where(wrapped, shifted - BLOCK_N, shifted), axis=0)
    same = tl.sum(tl.where(wrapped, 0.0, skewed), 1)
    wrap = tl.sum(tl.where(wrapped, skewed, 0.0), 1)
    at = offset + tl.arange(0, BLOCK_N)
    tl.debug_barrier()  # the previous tile's stores (other threads' lanes) are visible
    inside = (at >= 0) & (at < n_dist)
    tl.store(DBias + at, tl.load(DBias + at, mask=inside, other=0.0) + same, mask=inside)
    at -= BLOCK_N
    inside = (at >= 0) & (at < n_dist)
    tl.store(DBias + at, tl.load(DBias + at, mask=inside, other=0.0) + wrap, mask=inside)


@triton.jit
def _tile(Base, rows, stride, offs_d, ALIGNED: tl.constexpr):
    """Pointers to a (rows, head_dim) tile whose rows start ``stride`` elements apart."""
    ptrs = Base + rows[:, None] * stride + offs_d[None, :]
    if ALIGNED:
        # What the runtime learns from 16-byte aligned pointers and strides; stated here so that the
        # ahead-of-time compile (which knows nothing of the arguments) vectorises the same way.
        ptrs = tl.multiple_of(ptrs, [16, 16])
    return ptrs


@triton.jit(do_not_specialize=["total", "max_seqlen"])
def _attn_fwd(
    Q, K, V, Out, Lse, CuSeqlens, Seed, Bias,
    stride_t, stride_h, stride_ot, stride_oh, stride_bias,
    total, n_heads, max_seqlen,
    qk_scale, out_scale, drop_threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, BIAS: tl.constexpr, ALIGNED: tl.constexpr,
):
    # One program per (query block, sequence, head); query blocks of one head are adjacent, for L2 reuse of K/V.
    pid = tl.program_id(0)
    n_mblocks = tl.cdiv(max_seqlen, BLOCK_M)
    bh = pid // n_mblocks
    start_m = (pid % n_mblocks) * BLOCK_M
    h = bh % n_heads
    seq_start = tl.load(CuSeqlens + bh // n_heads)
    seqlen = tl.load(CuSeqlens + bh // n_heads + 1) - seq_start
    if start_m >= seqlen:
        return
    # 64-bit base offsets: a packed batch can exceed 2**31 elements, one sequence cannot.
    base = seq_start.to(tl.int64) * stride_t + h * stride_h
    Q += base
    K += base
    V += base

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < seqlen
    q = tl.load(_tile(Q, offs_m, stride_t, offs_d, ALIGNED), mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DROPOUT:
        key = dropout_key(tl.load(Seed))
    if BIAS:
        Bias += h * stride_bias + (max_seqlen - 1)  # Bias[d] is now the bias of key - query distance d
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < seqlen
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(_tile(K, cols, stride_t, offs_d, ALIGNED), mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if BIAS:
            s += _distance_bias(Bias, offs_m[:, None], cols[None, :], m_mask[:, None] & n_mask[None, :])
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        # The normaliser sums the probabilities before dropout, as softmax-then-dropout does.
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = tl.where(_dropout_keep(key, seq_start, h, n_heads, offs_m[:, None], cols[None, :],
                                       drop_threshold), p, 0.0)
        v = tl.load(_tile(V, cols, stride_t, offs_d, ALIGNED), mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    acc = acc * (out_scale / l_i)[:, None]
    Out += seq_start.to(tl.int64) * stride_ot + h * stride_oh
    tl.store(_tile(Out, offs_m, stride_ot, offs_d, ALIGNED), acc.to(Out.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])
    Lse += h.to(tl.int64) * total + seq_start
    tl.store(Lse + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_mask)


@triton.jit(do_not_specialize=["total"])
def _attn_bwd_delta(
    Out, DO, Delta,
    stride_ot, stride_oh, stride_dot, stride_doh, total,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, ALIGNED: tl.constexpr,
):
    # delta[h, t] = sum_d O[t, h, d] * dO[t, h, d]; over packed tokens, so no sequence bookkeeping.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_tile(Out + h * stride_oh, rows, stride_ot, offs_d, ALIGNED), mask=mask, other=0.0)
    do = tl.load(_tile(DO + h * stride_doh, rows, stride_dot, offs_d, ALIGNED), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h.to(tl.int64) * total + rows, delta, mask=rows < total)


@triton.jit(do_not_specialize=["total", "max_seqlen"])
def _attn_bwd(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV, CuSeqlens, Seed, Bias, DBias,
    stride_t, stride_h, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh, stride_bias,
    total, n_heads, max_seqlen,
    qk_scale, sm_scale, drop_scale, drop_threshold,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    DQ_MODE: tl.constexpr, DROPOUT: tl.constexpr, BIAS: tl.constexpr, ALIGNED: tl.constexpr,
):
    # One program per (key block, sequence, head): dK, dV of its keys; in DQ_RECOMPUTE mode also dQ of the
    # query block with the same index (BLOCK_M2 = BLOCK_N1). With the bias, also the program's row of
    # per-distance sums of dS (DBias: (programs, 2 * max_seqlen - 1), zeroed by the launcher).
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(max_seqlen, BLOCK_N1)
    bh = pid // n_blocks
    start_n = (pid % n_blocks) * BLOCK_N1
    h = bh % n_heads
    seq_start = tl.load(CuSeqlens + bh // n_heads)
    seqlen = tl.load(CuSeqlens + bh // n_heads + 1) - seq_start
    if start_n >= seqlen:
        return
    base = seq_start.to(tl.int64) * stride_t + h * stride_h
    Q += base
    K += base
    V += base
    DO += seq_start.to(tl.int64) * stride_dot + h * stride_doh
    DQ += seq_start.to(tl.int64) * stride_dqt + h * stride_dqh
    DK += seq_start.to(tl.int64) * stride_dkt + h * stride_dkh
    DV += seq_start.to(tl.int64) * stride_dkt + h * stride_dkh
    Lse += h.to(tl.int64) * total + seq_start
    Delta += h.to(tl.int64) * total + seq_start

    if BIAS:
        Bias += h * stride_bias + (max_seqlen - 1)
        DBias += pid.to(tl.int64) * (2 * max_seqlen - 1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    cols = start_n + tl.arange(0, BLOCK_N1)
    n_valid = cols < seqlen
    kv_mask = n_valid[:, None] & d_mask[None, :]
    k = tl.load(_tile(K, cols, stride_t, offs_d, ALIGNED), mask=kv_mask, other=0.0)
    v = tl.load(_tile(V, cols, stride_t, offs_d, ALIGNED), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    if DROPOUT:
        key = dropout_key(tl.load(Seed))
    offs_m1 = tl.arange(0, BLOCK_M1)
    # Transposed tiles (keys x queries) keep dK, dV in the MMA output layout. Query rows past the end load
    # q = dO = 0 and lse = +inf, so their P and dS are exactly 0; key rows past the end are never stored.
    for start_m in range(0, seqlen, BLOCK_M1):
        rows = start_m + offs_m1
        m_mask = rows < seqlen
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(_tile(Q, rows, stride_t, offs_d, ALIGNED), mask=q_mask, other=0.0)
        do = tl.load(_tile(DO, rows, stride_dot, offs_d, ALIGNED), mask=q_mask, other=0.0)
        lse2 = tl.load(Lse + rows, mask=m_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + rows, mask=m_mask, other=0.0)
        sT = tl.dot(k, tl.trans(q)) * qk_scale
        if BIAS:
            sT += _distance_bias(Bias, rows[None, :], cols[:, None], n_valid[:, None] & m_mask[None, :])
        pT = tl.exp2(sT - lse2[None, :])
        dpT = tl.dot(v, tl.trans(do))
        if DROPOUT:
            keep = _dropout_keep(key, seq_start, h, n_heads, rows[None, :], cols[:, None], drop_threshold)
            pdT = tl.where(keep, pT * drop_scale, 0.0)
            dpT = tl.where(keep, dpT * drop_scale, 0.0)
        else:
            pdT = pT
        dv = tl.dot(pdT.to(do.dtype), do, dv)
        dsT = pT * (dpT - delta[None, :])
        if BIAS:
            # Key rows past the end see q = 0, not -inf: their dS is not zero, only never stored.
            _add_diagonal_sums(DBias, tl.where(n_valid[:, None], dsT, 0.0), 2 * max_seqlen - 1,
                               start_n - start_m + (max_seqlen - 1), BLOCK_N1, BLOCK_M1)
        dk = tl.dot(dsT.to(q.dtype), q, dk)
        if DQ_MODE != _DQ_RECOMPUTE:
            dq = tl.dot(tl.trans(dsT).to(k.dtype), k) * sm_scale
            dq_ptrs = _tile(DQ, rows, stride_dqt, offs_d, ALIGNED)
            if DQ_MODE == _DQ_STORE:
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)
            else:
                tl.atomic_add(dq_ptrs, dq, mask=q_mask, sem="relaxed")
    tl.store(_tile(DK, cols, stride_dkt, offs_d, ALIGNED), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(_tile(DV, cols, stride_dkt, offs_d, ALIGNED), dv.to(DV.dtype.element_ty), mask=kv_mask)

    if DQ_MODE == _DQ_RECOMPUTE:
        rows = start_n + tl.arange(0, BLOCK_N1)
        m_mask = rows < seqlen
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(_tile(Q, rows, stride_t, offs_d, ALIGNED), mask=q_mask, other=0.0)
        do = tl.load(_tile(DO, rows, stride_dot, offs_d, ALIGNED), mask=q_mask, other=0.0)
        lse2 = tl.load(Lse + rows, mask=m_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(Delta + rows, mask=m_mask, other=0.0)
        dq = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        offs_n2 = tl.arange(0, BLOCK_N2)
        # Key rows past the end load k = v = 0, so they add nothing to dS K.
        for start_n2 in range(0, seqlen, BLOCK_N2):
            cols2 = start_n2 + offs_n2
            kv2_mask = (cols2 < seqlen)[:, None] & d_mask[None, :]
            k2 = tl.load(_tile(K, cols2, stride_t, offs_d, ALIGNED), mask=kv2_mask, other=0.0)
            v2 = tl.load(_tile(V, cols2, stride_t, offs_d, ALIGNED), mask=kv2_mask, other=0.0)
            s2 = tl.dot(q, tl.trans(k2)) * qk_scale
            if BIAS:
                s2 += _distance_bias(Bias, rows[:, None], cols2[None, :], m_mask[:, None] & (cols2 < seqlen)[None, :])
            p = tl.exp2(s2 - lse2[:, None])
            dp = tl.dot(do, tl.trans(v2))
            if DROPOUT:
                keep = _dropout_keep(key, seq_start, h, n_heads, rows[:, None], cols2[None, :], drop_threshold)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k2.dtype), k2, dq)
        tl.store(_tile(DQ, rows, stride_dqt, offs_d, ALIGNED), (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=q_mask)


@triton.jit(do_not_specialize=["max_seqlen"])
def _dropout_mask_kernel(
    Mask, CuSeqlens, Seed, n_heads, max_seqlen, drop_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Writes the keep mask of one (query block, sequence, head) into a (batch, heads, S, S) uint8 tensor.
    pid = tl.program_id(0)
    n_mblocks = tl.cdiv(max_seqlen, BLOCK_M)
    bh = pid // n_mblocks
    start_m = (pid % n_mblocks) * BLOCK_M
    seq_start = tl.load(CuSeqlens + bh // n_heads)
    seqlen = tl.load(CuSeqlens + bh // n_heads + 1) - seq_start
    if start_m >= seqlen:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    Mask += bh.to(tl.int64) * max_seqlen * max_seqlen
    key = dropout_key(tl.load(Seed))
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(key, seq_start, bh % n_heads, n_heads, rows[:, None], cols[None, :], drop_threshold)
        tl.store(Mask + rows[:, None] * max_seqlen + cols[None, :], keep.to(tl.uint8),
                 mask=(rows < seqlen)[:, None] & (cols < seqlen)[None, :])


# ---------------------------------------------------------------------------------------------------------
# Configurations: one table per architecture, keyed by (padded head dim, short sequences?).


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    block_m1: int  # query rows per step of the dK/dV loop
    block_n1: int  # keys per program (and query rows per program of the dQ loop)
    block_n2: int  # keys per step of the dQ loop
    num_warps: int
    num_stages: int


SHORT_SEQLEN = 128  # BERT pretraining phase 1; phase 2 and fine-tuning use up to 512

# table -> (block_d, max_seqlen <= SHORT_SEQLEN) -> (forward, backward); ``table_for`` says which table a
# GPU uses and the ahead-of-time check compiles each table for the architectures that use it. The sm_80
# entries stay under 99 KB of shared memory, so that table also serves sm_86/sm_89 and unknown parts.
# 128-row tiles take 8 warps (with 4, the dK/dV accumulators and the dropout mask spilled, when the mask
# was Philox); the dK/dV loop steps 16 query rows at a time where 32 left no register headroom. With the
# counter-hash mask, sm_80's 64-row forward at head_dim 128 spills with 4 warps (ptxas keeps it to 168
# registers): it takes 8 (128 registers, no spill; the same tiles and stages, not yet re-timed on a GPU).
# Short sequences take 64-row query blocks (fewer wasted rows in ragged batches) and one 128-key block per
# program in backward, so that dQ is complete inside the loop (DQ_STORE); head_dim 128 halves that block.
CONFIGS: dict[str, dict[tuple[int, bool], tuple[FwdConfig, BwdConfig]]] = {
    "sm_80": {
        (32, True): (FwdConfig(64, 64, 4, 3), BwdConfig(32, 128, 32, 8, 2)),
        (32, False): (FwdConfig(128, 64, 8, 3), BwdConfig(32, 128, 32, 8, 2)),
        (64, True): (FwdConfig(64, 64, 4, 3), BwdConfig(16, 128, 32, 8, 2)),
        (64, False): (FwdConfig(128, 64, 8, 3), BwdConfig(16, 128, 32, 8, 2)),
        (128, True): (FwdConfig(64, 32, 8, 2), BwdConfig(16, 64, 32, 8, 2)),
        (128, False): (FwdConfig(128, 32, 8, 2), BwdConfig(16, 64, 32, 8, 2)),
    },
    "sm_90": {  # 228 KB of shared memory: a wider, deeper forward for short sequences at head_dim 128
        (32, True): (FwdConfig(64, 64, 4, 3), BwdConfig(32, 128, 32, 8, 2)),
        (32, False): (FwdConfig(128, 64, 8, 3), BwdConfig(32, 128, 32, 8, 2)),
        (64, True): (FwdConfig(64, 64, 4, 3), BwdConfig(16, 128, 32, 8, 2)),
        (64, False): (FwdConfig(128, 64, 8, 3), BwdConfig(16, 128, 32, 8, 2)),
        (128, True): (FwdConfig(64, 64, 8, 3), BwdConfig(16, 64, 32, 8, 2)),
        (128, False): (FwdConfig(128, 32, 8, 2), BwdConfig(16, 64, 32, 8, 2)),
    },
}
# The bias adds registers to backward (the gathered bias tile, the skewed dS tile of the diagonal sums):
# where a table's backward then spills, the biased call takes its own tiles (same keys as CONFIGS). sm_80,
# head_dim 64, short: one 128-key block (DQ_STORE) spilled 8 bytes (64 with dropout) at 255 registers, also
# with 16-key dQ steps; 64-key blocks do not. sm_90, head_dim 128: DQ_RECOMPUTE with dropout spilled 64
# bytes (116 with one stage); 16-key dQ steps do not.
BIASED_BWD: dict[str, dict[tuple[int, bool], BwdConfig]] = {
    "sm_80": {(64, True): BwdConfig(16, 64, 32, 8, 2)},
    "sm_90": {(128, True): BwdConfig(16, 64, 16, 8, 2), (128, False): BwdConfig(16, 64, 16, 8, 2)},
}
DELTA_BLOCK_T = 64


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def table_for(capability: int) -> str:
    """The configuration table for a GPU of compute capability ``capability`` (e.g. 90 for an H100)."""
    return "sm_90" if capability // 10 in (9, 10) else "sm_80"


def _table(device: torch.device) -> str:
    if device.type != "cuda":
        return "sm_80"  # the interpreter: any table works, this one keeps tiles small
    major, minor = torch.cuda.get_device_capability(device)
    return table_for(10 * major + minor)


def select_configs(device: torch.device, head_dim: int, max_seqlen: int,
                   biased: bool = False) -> tuple[FwdConfig, BwdConfig]:
    """The (forward, backward) configuration the launchers use for these inputs (``biased``: with a bias)."""
    table, key = _table(device), (max(32, _block_d(head_dim)), max_seqlen <= SHORT_SEQLEN)
    fwd, bwd = CONFIGS[table][key]
    return fwd, (BIASED_BWD[table].get(key, bwd) if biased else bwd)


def _dq_mode(max_seqlen: int, cfg: BwdConfig, deterministic: bool) -> int:
    if max_seqlen <= cfg.block_n1:
        return DQ_STORE
    return DQ_RECOMPUTE if deterministic else DQ_ATOMIC


def _aligned(*tensors: Tensor) -> bool:
    """Whether every tile row of these (tokens, heads, head_dim) tensors starts on a 16-byte boundary.

    Read from the storage offset and strides (torch's allocations themselves are aligned), so that it
    also answers for the fake tensors that ``torch.compile`` traces with.
    """
    return all(
        all(s * t.element_size() % 16 == 0 for s in (t.storage_offset(), *t.stride()[:-1])) for t in tensors
    )


def _rows_aligned(x: Tensor) -> Tensor:
    """``x`` itself, or a contiguous copy when its layout would lose the 16-byte aligned (vectorised) path."""
    return x if _aligned(x) or x.is_contiguous() else x.contiguous()


# ---------------------------------------------------------------------------------------------------------
# Launchers.


def _forward(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float, dropout_p: float,
             seed: Tensor | None, cfg: FwdConfig, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse); ``bias``: (heads, 2 * max_seqlen - 1) fp32, the score bias of each key - query distance."""
    total, _, heads, head_dim = qkv.shape
    out = qkv.new_empty(total, heads, head_dim)
    lse = torch.empty(heads, total, device=qkv.device, dtype=torch.float32)
    batch = cu_seqlens.shape[0] - 1
    q, k, v = qkv.unbind(1)
    # Programs past a sequence's end (max_seqlen is an upper bound) return at once; 0 tokens: none do work.
    grid = (triton.cdiv(max_seqlen, cfg.block_m) * batch * heads,)
    wrap_triton(_attn_fwd)[grid](
        q, k, v, out, lse, cu_seqlens, seed, bias,
        qkv.stride(0), qkv.stride(2), out.stride(0), out.stride(1), 0 if bias is None else bias.stride(0),
        total, heads, max_seqlen,
        scale * LOG2E, dropout.scale(dropout_p), dropout.threshold(dropout_p),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DROPOUT=seed is not None, BIAS=bias is not None, ALIGNED=_aligned(q, k, v, out),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              scale: float, dropout_p: float, seed: Tensor | None, cfg: BwdConfig, deterministic: bool,
              bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(dqkv, dbias): dbias (heads, 2 * max_seqlen - 1) fp32 with ``bias``, else None."""
    total, _, heads, head_dim = qkv.shape
    block_d = _block_d(head_dim)
    dout = _rows_aligned(dout if dout.stride(-1) == 1 else dout.contiguous())
    delta = torch.empty(heads, total, device=qkv.device, dtype=torch.float32)
    wrap_triton(_attn_bwd_delta)[(triton.cdiv(total, DELTA_BLOCK_T), heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=DELTA_BLOCK_T, ALIGNED=_aligned(out, dout),
    )
    dqkv = torch.empty(total, 3, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    dq, dk, dv = dqkv.unbind(1)
    mode = _dq_mode(max_seqlen, cfg, deterministic)
    if mode == DQ_ATOMIC:
        dq = torch.zeros(total, heads, head_dim, device=qkv.device, dtype=torch.float32)
    q, k, v = qkv.unbind(1)
    batch = cu_seqlens.shape[0] - 1
    n_blocks = triton.cdiv(max_seqlen, cfg.block_n1)
    grid = (n_blocks * batch * heads,)
    # One row of per-distance dS sums per program, summed below in a fixed order (deterministic).
    partial = None if bias is None else torch.zeros(grid[0], bias.shape[1], device=qkv.device, dtype=torch.float32)
    wrap_triton(_attn_bwd)[grid](
        q, k, v, dout, lse, delta, dq, dk, dv, cu_seqlens, seed, bias, partial,
        qkv.stride(0), qkv.stride(2), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        dk.stride(0), dk.stride(1), 0 if bias is None else bias.stride(0),
        total, heads, max_seqlen,
        scale * LOG2E, scale, dropout.scale(dropout_p), dropout.threshold(dropout_p),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_N2=cfg.block_n2,
        DQ_MODE=mode, DROPOUT=seed is not None, BIAS=bias is not None,
        ALIGNED=_aligned(q, k, v, dout, dq, dk, dv), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if mode == DQ_ATOMIC:
        dqkv[:, 0].copy_(dq)
    if partial is None:
        return dqkv, None
    return dqkv, partial.view(batch, heads, n_blocks, bias.shape[1]).sum((0, 2))


def _packed(qkv: Tensor) -> Tensor:
    return _rows_aligned(qkv if qkv.stride(-1) == 1 else qkv.contiguous())


def _forward_fake(qkv, cu_seqlens, seed, bias, max_seqlen, dropout_p, scale, deterministic):
    total, _, heads, head_dim = qkv.shape
    return qkv.new_empty(total, heads, head_dim), qkv.new_empty(heads, total, dtype=torch.float32)


@kernel_op("attention_triton", _forward_fake)
def _forward_op(
    qkv: Tensor, cu_seqlens: Tensor, seed: Tensor | None, bias: Tensor | None, max_seqlen: int, dropout_p: float,
    scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """(out, lse); dropout on the probabilities where a seed is given, the per-distance score bias where
    ``bias`` is. ``deterministic`` is for backward."""
    fwd_cfg, _ = select_configs(qkv.device, qkv.shape[-1], max_seqlen)
    return _forward(_packed(qkv), cu_seqlens, max_seqlen, scale, dropout_p, seed, fwd_cfg, bias)


def _backward_fake(dout, qkv, out, lse, cu_seqlens, seed, bias, max_seqlen, dropout_p, scale, deterministic):
    dbias = qkv.new_empty(0, dtype=torch.float32) if bias is None else torch.empty_like(bias)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), dbias


@kernel_op("attention_triton_backward", _backward_fake)
def _backward_op(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor, seed: Tensor | None,
    bias: Tensor | None, max_seqlen: int, dropout_p: float, scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """(dqkv (T, 3, heads, head_dim), dbias: like ``bias``, or empty without it)."""
    _, bwd_cfg = select_configs(qkv.device, qkv.shape[-1], max_seqlen, biased=bias is not None)
    dqkv, dbias = _backward(dout, _packed(qkv), out, lse, cu_seqlens, max_seqlen, scale, dropout_p, seed, bwd_cfg,
                            deterministic, bias)
    return dqkv, qkv.new_empty(0, dtype=torch.float32) if dbias is None else dbias


def _setup_context(ctx, inputs, output) -> None:
    qkv, cu_seqlens, seed, bias, *ctx.args = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens, seed, bias)


def _backward_autograd(ctx, dout: Tensor, _dlse) -> tuple[Tensor | None, ...]:
    qkv, out, lse, cu_seqlens, seed, bias = ctx.saved_tensors
    dqkv, dbias = _backward_op(dout, qkv, out, lse, cu_seqlens, seed, bias, *ctx.args)
    return dqkv, None, None, dbias if bias is not None else None, None, None, None, None


_forward_op.register_autograd(_backward_autograd, setup_context=_setup_context)


def supports(qkv: Tensor, bias_table: Tensor | None = None, window: int | None = None,
             columns: Tensor | None = None, pos_index: Tensor | None = None) -> bool:
    """fp16/bf16 on CUDA (fp32 goes to SDPA there: IEEE fp32 dots would be slow and the AOT check compiles no
    fp32 kernel); fp32/fp16 CPU tensors in the interpreter (whose tl.dot is wrong in bf16); head dims <= 128.
    A bias table of any floating dtype on the same device (it is read in fp32). No window, columns or
    disentangled (DeBERTa) terms (yet)."""
    if window is not None or columns is not None or pos_index is not None:
        return False
    if bias_table is not None and (bias_table.device != qkv.device or not bias_table.is_floating_point()):
        return False
    if qkv.dim() == 4 and qkv.shape[-1] > MAX_HEAD_DIM:
        return False
    if qkv.device.type == "cuda":
        return qkv.dtype in (torch.float16, torch.bfloat16)
    return TRITON_INTERPRETED and qkv.device.type == "cpu" and qkv.dtype in (torch.float16, torch.float32)


def flash_attention(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    *,
    deterministic: bool | None = None,
    seed: Tensor | None = None,
    bias_table: Tensor | None = None,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Tensor:
    """Attention over packed sequences: qkv (T, 3, heads, head_dim) -> (T, heads, head_dim).

    ``cu_seqlens`` (batch + 1,) holds the sequence offsets among the T tokens and ``max_seqlen`` is
    an upper bound of the longest sequence. ``dropout_p`` applies as given (no ``training`` flag
    here), with ``seed`` (a 0-dim int64 tensor) or one drawn by :func:`bertfast.common.dropout.draw_seed`.
    ``deterministic`` defaults to True unless ``BERTFAST_ATTENTION_DETERMINISTIC=0`` (and is forced by
    ``torch.use_deterministic_algorithms``). ``bias_table`` (num_buckets, heads): MPNet's
    relative-position bias (``bertfast.ops.attention``); the kernels read it per distance.
    """
    dropout.check_probability(dropout_p)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (tokens, 3, heads, head_dim), got {tuple(qkv.shape)}")
    if not supports(qkv, bias_table):
        raise ValueError(f"the attention kernels do not take {qkv.dtype} qkv of head dim {qkv.shape[-1]} on "
                         f"{qkv.device.type}" + ("" if bias_table is None else
                                                 f" with a {bias_table.dtype} bias table on {bias_table.device}")
                         + "; bertfast.ops.attention runs the reference for it")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(qkv.shape[-1])
    if dropout_p > 0.0 and seed is None:
        seed = dropout.draw_seed(qkv.device)
    elif dropout_p == 0.0:
        seed = None
    if torch.are_deterministic_algorithms_enabled():
        deterministic = True
    elif deterministic is None:
        deterministic = DETERMINISTIC_DEFAULT
    bias = None
    if bias_table is not None:
        relative_position.check_bias_table(bias_table, qkv.shape[2], num_buckets, max_distance)
        # The bucket of each distance is the reference's own (no float log in the kernels to disagree at a
        # bucket boundary); the gather's backward adds each distance's gradient into its bucket.
        bias = relative_position.distance_bias(bias_table, max_seqlen, num_buckets, max_distance).float().contiguous()
    cu_seqlens = cu_seqlens.to(device=qkv.device, dtype=torch.int32)
    return _forward_op(qkv, cu_seqlens, seed, bias, max_seqlen, dropout_p, scale, deterministic)[0]


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
    """``bertfast.ops.attention`` on the Triton kernels (same signature and result as the reference); no
    window, columns or disentangled terms (``supports`` refuses such calls)."""
    if window is not None or columns is not None or pos_index is not None:
        raise ValueError("the Triton attention kernels take no sliding window, columns or disentangled terms")
    return flash_attention(qkv, cu_seqlens, max_seqlen, dropout_p if training else 0.0, softmax_scale,
                           bias_table=bias_table, num_buckets=num_buckets, max_distance=max_distance)


def dropout_keep_mask(seed: Tensor, cu_seqlens: Tensor, heads: int, max_seqlen: int, dropout_p: float) -> Tensor:
    """The kernels' dropout keep-mask, (batch, heads, max_seqlen, max_seqlen) bool, [b, h, query, key].

    Entries outside a sequence are False. Runs the kernels' own keep function, so a reference built
    with this mask sees exactly the probabilities the kernels kept.
    """
    batch = cu_seqlens.numel() - 1
    mask = torch.zeros(batch, heads, max_seqlen, max_seqlen, device=cu_seqlens.device, dtype=torch.uint8)
    block = 32
    wrap_triton(_dropout_mask_kernel)[(triton.cdiv(max_seqlen, block) * batch * heads,)](
        mask, cu_seqlens.to(torch.int32), seed, heads, max_seqlen, dropout.threshold(dropout_p),
        BLOCK_M=block, BLOCK_N=block,
    )
    return mask.bool()


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time specs: every (kernel, configuration) the launchers can pick.


def _dq_modes(cfg: BwdConfig, short: bool) -> list[int]:
    """DQ modes reachable with ``cfg`` for max_seqlen in (0, SHORT_SEQLEN] (short) or above it."""
    lowest, highest = (1, SHORT_SEQLEN) if short else (SHORT_SEQLEN + 1, None)
    modes = [DQ_STORE] if lowest <= cfg.block_n1 else []
    if highest is None or highest > cfg.block_n1:
        modes += [DQ_RECOMPUTE, DQ_ATOMIC]
    return modes


class _UsedBy:
    """The capabilities whose configuration table is one of ``tables`` (an AotSpec's ``capabilities``)."""

    def __init__(self, tables: set[str]):
        self.tables = tables

    def __call__(self, capability: int) -> bool:
        return table_for(capability) in self.tables


def aot_specs() -> list[AotSpec]:
    # A configuration can appear in several tables: it is compiled for every architecture that uses one of them.
    tables: dict[tuple, set[str]] = {}
    for table, entries in CONFIGS.items():
        for (block_d, short), (fwd, bwd) in entries.items():
            biased_bwd = BIASED_BWD[table].get((block_d, short), bwd)
            for dtype in (torch.float16, torch.bfloat16):
                tables.setdefault((fwd, bwd, biased_bwd, block_d, short, dtype), set()).add(table)
    specs: dict[str, AotSpec] = {}
    for (fwd, unbiased_bwd, biased_bwd, block_d, short, dtype), used_in in tables.items():
        used_by = _UsedBy(used_in)
        qkv, out, dout = meta(8, 3, 2, block_d, dtype=dtype), meta(8, 2, block_d, dtype=dtype), meta(8, 2, block_d,
                                                                                                     dtype=dtype)
        cu_seqlens, lse = meta(3, dtype=torch.int32), meta(2, 8)
        dtype_name = DTYPES[dtype]
        for (seed, p), biased in itertools.product(((None, 0.0), (meta(dtype=torch.int64), 0.1)), (False, True)):
            tag = f"D={block_d},{dtype_name}" + (",dropout" if seed is not None else "") + (",bias" if biased else "")
            fwd_seqlen = SHORT_SEQLEN if short else 512
            bias = meta(2, 2 * fwd_seqlen - 1) if biased else None
            (launch,) = record(_forward, qkv, cu_seqlens, fwd_seqlen, 0.125, p, seed, fwd, bias)
            name = f"attn_fwd[{tag},M={fwd.block_m},N={fwd.block_n},w={fwd.num_warps},s={fwd.num_stages}]"
            _add(specs, spec(name, launch, capabilities=used_by))
            bwd = biased_bwd if biased else unbiased_bwd
            for mode in _dq_modes(bwd, short):
                # The smallest bound that reaches the mode: one key block (store), or one key more.
                max_seqlen = bwd.block_n1 + (mode != DQ_STORE)
                bias = meta(2, 2 * max_seqlen - 1) if biased else None
                delta, launch = record(_backward, dout, qkv, out, lse, cu_seqlens, max_seqlen, 0.125, p, seed, bwd,
                                       mode != DQ_ATOMIC, bias)
                name = (f"attn_bwd[{tag},dq={('store', 'atomic', 'recompute')[mode]},M1={bwd.block_m1},"
                        f"N1={bwd.block_n1},N2={bwd.block_n2},w={bwd.num_warps},s={bwd.num_stages}]")
                _add(specs, spec(name, launch, capabilities=used_by))
                specs[f"attn_bwd_delta[D={block_d},{dtype_name}]"] = spec(
                    f"attn_bwd_delta[D={block_d},{dtype_name}]", delta)
    (launch,) = record(dropout_keep_mask, meta(dtype=torch.int64), meta(3, dtype=torch.int32), 2, 64, 0.1)
    specs["dropout_mask"] = spec("dropout_mask", launch, tuned=False)
    return list(specs.values())


def _add(specs: dict[str, AotSpec], spec: AotSpec) -> None:
    """Add ``spec`` once; the same compilation reached from another table widens where it is used."""
    seen = specs.get(spec.name)
    if seen is not None:
        spec = dataclasses.replace(spec, capabilities=_UsedBy(seen.capabilities.tables | spec.capabilities.tables))
    specs[spec.name] = spec

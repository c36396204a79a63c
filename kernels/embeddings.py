"""dropout(LayerNorm(word[ids] + position[pos] + type[tt])): BERT's embedding layer on packed ids.

Forward, per token (fp32 inside)::

    h = word[ids[t]] + position[pos[t]] + type[tt[t]]     # or inputs_embeds[t] for the word row
    y = dropout((h - mean) * rstd * gamma + beta)         # keep with prob 1 - p, kept * 1 / (1 - p)

The forward stores y and (mean, rstd) per token; the backward gathers h again (the tables
stay alive as parameters) and regenerates the dropout mask (a counter hash of the seed) from the seed. Backward::

    dh = LayerNorm backward of (dropout-mask(dy) / (1 - p))
    dgamma = sum_t dy' * x_hat;  dbeta = sum_t dy'    (per-program fp32 partials)
    dword[v] = sum over tokens with ids == v of dh    (and likewise position, type)

The table gradients are written without atomics: the ids are sorted, fixed blocks of
``_SEGMENT_ROWS`` sorted tokens sum their runs of equal ids in fp32 and write each run that
they hold entirely; a run that crosses block boundaries leaves one partial per block, which
the block where it starts adds up. Each gradient row is written once, so duplicate ids
accumulate exactly and deterministically, and the ``padding_idx`` row gets no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from bertfast.common import dropout
from bertfast.common.library import kernel_op, wrap_triton
from bertfast.kernels.aot import AotSpec, meta, record, spec
from bertfast.kernels.layernorm_common import (
    MAX_HIDDEN,
    aot_rows,
    dropout_keep,
    kernels_run,
    layernorm_row,
    layernorm_row_grad,
    partial_programs,
    partial_sums,
    reduce_partials,
    row_config,
    row_outputs,
    row_tag,
)

_SEGMENT_ROWS = 32  # sorted tokens per program of the gradient scatter


@triton.jit
def _gather_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, row, cols, mask, H,
                FROM_EMBEDS: tl.constexpr):
    """h of one token, fp32: its word row (or inputs_embeds row) + position row + type row."""
    if FROM_EMBEDS:
        word_row = row
    else:
        word_row = tl.load(ids_ptr + row).to(tl.int64)
    h = tl.load(word_ptr + word_row * H + cols, mask=mask, other=0.0).to(tl.float32)
    pos_row = tl.load(pos_ids_ptr + row).to(tl.int64)
    h += tl.load(pos_ptr + pos_row * H + cols, mask=mask, other=0.0).to(tl.float32)
    type_row = tl.load(type_ids_ptr + row).to(tl.int64)
    h += tl.load(type_ptr + type_row * H + cols, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _emb_fwd_kernel(
    ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr, b_ptr,
    y_ptr, mean_ptr, rstd_ptr, seed_ptr, H, eps, threshold, scale,
    BLOCK: tl.constexpr, HAS_DROPOUT: tl.constexpr, FROM_EMBEDS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    h = _gather_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, row, cols, mask, H,
                    FROM_EMBEDS)
    y, mean, rstd = layernorm_row(h, cols, mask, H, eps, w_ptr, b_ptr)
    offsets = row * H + cols
    if HAS_DROPOUT:
        y = tl.where(dropout_keep(tl.load(seed_ptr), row, cols, threshold), y * scale, 0.0)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _emb_bwd_kernel(
    dy_ptr, ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr,
    mean_ptr, rstd_ptr, seed_ptr, dh_ptr, partial_ptr, n_rows, H, threshold, scale,
    BLOCK: tl.constexpr, HAS_DROPOUT: tl.constexpr, FROM_EMBEDS: tl.constexpr,
):
    # Program g walks tokens g, g + G, ...; partials: (2, G, H) = dgamma, dbeta.
    g = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for i in range(g, n_rows, n_programs):
        row = tl.cast(i, tl.int64)
        h = _gather_sum(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, row, cols, mask, H,
                        FROM_EMBEDS)
        rstd = tl.load(rstd_ptr + row)
        x_hat = tl.where(mask, (h - tl.load(mean_ptr + row)) * rstd, 0.0)
        offsets = row * H + cols
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            dy = tl.where(dropout_keep(seed, row, cols, threshold), dy * scale, 0.0)
        dh = layernorm_row_grad(x_hat, dy, w, rstd, H)
        tl.store(dh_ptr + offsets, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
        db += dy
    out = partial_ptr + g.to(tl.int64) * H + cols
    tl.store(out, dw, mask=mask)
    tl.store(out + n_programs.to(tl.int64) * H, db, mask=mask)


@triton.jit
def _segment_sum_kernel(
    dh_ptr, sorted_ids_ptr, order_ptr, grad_ptr, carry_ptr, n_rows, H, skip_id,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # Block b sums sorted tokens [b * ROWS, (b + 1) * ROWS) run by run. carry[b, 0]: the run that
    # began in an earlier block (its head piece here); carry[b, 1]: the run that goes on past this block.
    blk = tl.program_id(0)
    start = blk * ROWS
    end = tl.minimum(start + ROWS, n_rows)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    carry = carry_ptr + blk.to(tl.int64) * 2 * H + cols
    cur = tl.load(sorted_ids_ptr + start).to(tl.int64)
    before = tl.load(sorted_ids_ptr + start - 1, mask=start > 0, other=-1).to(tl.int64)
    head = (before == cur).to(tl.int32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(start, end):
        idx = tl.load(sorted_ids_ptr + i).to(tl.int64)
        if idx != cur:
            if head != 0:
                tl.store(carry, acc, mask=mask)
            elif cur != skip_id:
                tl.store(grad_ptr + cur * H + cols, acc.to(grad_ptr.dtype.element_ty), mask=mask)
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            cur = idx
            head = head * 0
        token = tl.load(order_ptr + i)
        acc += tl.load(dh_ptr + token * H + cols, mask=mask, other=0.0).to(tl.float32)
    after = tl.load(sorted_ids_ptr + end, mask=end < n_rows, other=-1).to(tl.int64)
    if head != 0:
        tl.store(carry, acc, mask=mask)
    elif after == cur:
        tl.store(carry + H, acc, mask=mask)
    elif cur != skip_id:
        tl.store(grad_ptr + cur * H + cols, acc.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_carry_kernel(
    sorted_ids_ptr, grad_ptr, carry_ptr, n_rows, H, skip_id,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # The block where a cross-block run starts adds its tail piece and the following blocks' heads.
    blk = tl.program_id(0)
    start = blk * ROWS
    end = tl.minimum(start + ROWS, n_rows)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    last = tl.load(sorted_ids_ptr + end - 1).to(tl.int64)
    before = tl.load(sorted_ids_ptr + start - 1, mask=start > 0, other=-1).to(tl.int64)
    after = tl.load(sorted_ids_ptr + end, mask=end < n_rows, other=-1).to(tl.int64)
    if (after == last) & (before != last):
        acc = tl.load(carry_ptr + (blk.to(tl.int64) * 2 + 1) * H + cols, mask=mask, other=0.0)
        nxt = blk + 1
        more = after == last
        while more:
            acc += tl.load(carry_ptr + nxt.to(tl.int64) * 2 * H + cols, mask=mask, other=0.0)
            nxt_end = tl.minimum((nxt + 1) * ROWS, n_rows)
            more = tl.load(sorted_ids_ptr + nxt_end, mask=nxt_end < n_rows, other=-1).to(tl.int64) == last
            nxt += 1
        if last != skip_id:
            tl.store(grad_ptr + last * H + cols, acc.to(grad_ptr.dtype.element_ty), mask=mask)


def scatter_rows(dh: Tensor, ids: Tensor, n_table_rows: int, dtype: torch.dtype, skip_id: int = -1) -> Tensor:
    """grad[v] = sum of dh[t] over tokens t with ids[t] == v, fp32-accumulated; row ``skip_id`` stays 0."""
    n_rows, hidden = dh.shape
    grad = torch.zeros((n_table_rows, hidden), dtype=dtype, device=dh.device)
    sorted_ids, order = torch.sort(ids, stable=True)
    n_blocks = triton.cdiv(n_rows, _SEGMENT_ROWS)  # no programs at all for 0 tokens
    carry = torch.empty((n_blocks, 2, hidden), dtype=torch.float32, device=dh.device)
    block, num_warps = row_config(hidden)
    wrap_triton(_segment_sum_kernel)[(n_blocks,)](
        dh, sorted_ids, order, grad, carry, n_rows, hidden, skip_id,
        ROWS=_SEGMENT_ROWS, BLOCK=block, num_warps=num_warps,
    )
    wrap_triton(_segment_carry_kernel)[(n_blocks,)](
        sorted_ids, grad, carry, n_rows, hidden, skip_id, ROWS=_SEGMENT_ROWS, BLOCK=block, num_warps=num_warps,
    )
    return grad


def _out_dtype(words: Tensor, position_weight: Tensor, type_weight: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(words.dtype, position_weight.dtype), type_weight.dtype)


def _forward_fake(input_ids, position_ids, token_type_ids, words, position_weight, type_weight, ln_weight, ln_bias,
                  seed, eps, p, padding_idx):
    rows = position_ids.numel()
    y = words.new_empty((*position_ids.shape, words.shape[-1]), dtype=_out_dtype(words, position_weight,
                                                                                   type_weight))
    return y, words.new_empty(rows, dtype=torch.float32), words.new_empty(rows, dtype=torch.float32)


def _launch_forward(
    input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor, words: Tensor, position_weight: Tensor,
    type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor, seed: Tensor | None, eps: float, p: float,
    padding_idx: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd). ``words``: the word table, or inputs_embeds (one row per token) without input_ids.

    ``padding_idx`` (-1: none) is the word row that backward gives no gradient.
    """
    hidden = words.shape[-1]
    from_embeds = input_ids is None
    ids = None if from_embeds else input_ids.reshape(-1).contiguous()
    words_c = words.reshape(-1, hidden).contiguous()
    rows = position_ids.numel()
    y, mean, rstd = row_outputs(rows, hidden, _out_dtype(words, position_weight, type_weight), words.device)
    block, num_warps = row_config(hidden)
    wrap_triton(_emb_fwd_kernel)[(rows,)](
        ids, position_ids.reshape(-1).contiguous(), token_type_ids.reshape(-1).contiguous(), words_c,
        position_weight.contiguous(), type_weight.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(),
        y, mean, rstd, seed, hidden, eps, dropout.threshold(p), dropout.scale(p),
        BLOCK=block, HAS_DROPOUT=seed is not None, FROM_EMBEDS=from_embeds, num_warps=num_warps,
    )
    return y.view(*position_ids.shape, hidden), mean, rstd


_forward_op = kernel_op("embeddings_triton", _forward_fake)(_launch_forward)


def _backward_fake(dy, input_ids, position_ids, token_type_ids, words, position_weight, type_weight, ln_weight,
                   mean, rstd, seed, p, padding_idx, tables_needed):
    hidden = words.shape[-1]
    grads = [torch.empty_like(t) if need else t.new_empty(0)
             for t, need in zip((words, position_weight, type_weight), tables_needed, strict=True)]
    w = ln_weight.new_empty(hidden, dtype=torch.float32)
    return *grads, w, torch.empty_like(w)


def _launch_backward(
    dy: Tensor, input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor, words: Tensor,
    position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor, mean: Tensor, rstd: Tensor,
    seed: Tensor | None, p: float, padding_idx: int, tables_needed: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad of words, position and type tables (empty where not ``tables_needed``), fp32 dgamma, dbeta)."""
    hidden = words.shape[-1]
    from_embeds = input_ids is None
    ids = None if from_embeds else input_ids.reshape(-1).contiguous()
    pos_ids, type_ids = position_ids.reshape(-1).contiguous(), token_type_ids.reshape(-1).contiguous()
    words_c, pos_w, type_w = (t.reshape(-1, hidden).contiguous() for t in (words, position_weight, type_weight))
    rows = pos_ids.numel()
    dh = torch.empty((rows, hidden), dtype=dy.dtype, device=dy.device)
    programs = partial_programs(rows, dy.device)
    partials = partial_sums(2, programs, hidden, dy.device)
    block, num_warps = row_config(hidden)
    wrap_triton(_emb_bwd_kernel)[(programs,)](
        dy.reshape(rows, hidden).contiguous(), ids, pos_ids, type_ids, words_c, pos_w, type_w,
        ln_weight.contiguous(), mean, rstd, seed, dh, partials, rows, hidden, dropout.threshold(p),
        dropout.scale(p),
        BLOCK=block, HAS_DROPOUT=seed is not None, FROM_EMBEDS=from_embeds, num_warps=_bwd_warps(num_warps),
    )
    dw, db = (reduce_partials(sums) for sums in partials)  # separate tensors: op outputs may not alias
    need_words, need_pos, need_type = tables_needed
    d_words, d_pos, d_type = (dh.new_empty(0) for _ in range(3))
    if need_words:
        if from_embeds:
            d_words = dh.to(words.dtype).view(words.shape)
        else:
            d_words = scatter_rows(dh, ids, words.shape[0], words.dtype, padding_idx)
    if need_pos:
        d_pos = scatter_rows(dh, pos_ids, pos_w.shape[0], pos_w.dtype)
    if need_type:
        d_type = scatter_rows(dh, type_ids, type_w.shape[0], type_w.dtype)
    return d_words, d_pos, d_type, dw, db


_backward_op = kernel_op("embeddings_triton_backward", _backward_fake)(_launch_backward)


def _setup_context(ctx, inputs, output) -> None:
    input_ids, position_ids, token_type_ids, words, position_weight, type_weight, ln_weight, ln_bias, seed = inputs[:9]
    _, ctx.p, ctx.padding_idx = inputs[9:]
    _, mean, rstd = output
    ctx.save_for_backward(input_ids, position_ids, token_type_ids, words, position_weight, type_weight, ln_weight,
                          mean, rstd, seed)
    ctx.ln_bias_dtype = ln_bias.dtype


def _backward(ctx, dy: Tensor, _dmean, _drstd) -> tuple[Tensor | None, ...]:
    ids, pos_ids, type_ids, words, pos_w, type_w, ln_weight, mean, rstd, seed = ctx.saved_tensors
    needed = list(ctx.needs_input_grad[3:6])
    d_words, d_pos, d_type, dw, db = _backward_op(
        dy, ids, pos_ids, type_ids, words, pos_w, type_w, ln_weight, mean, rstd, seed, ctx.p, ctx.padding_idx,
        needed,
    )
    tables = [g if need else None for g, need in zip((d_words, d_pos, d_type), needed, strict=True)]
    return None, None, None, *tables, dw.to(ln_weight.dtype), db.to(ctx.ln_bias_dtype), None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
def _bwd_warps(num_warps: int) -> int:
    """The backward keeps two fp32 partial rows and the gathered tables live: half the values per
    thread of the forward, or Triton 3.6 spills at BLOCK=1024 on sm_80."""
    return min(16, 2 * num_warps)


def supports(*tensors: Tensor | None) -> bool:
    """CUDA (or the interpreter), fp32/bf16/fp16 tables, rows of at most MAX_HIDDEN."""
    return kernels_run(*tensors) and tensors[0].shape[-1] <= MAX_HIDDEN


def embeddings(
    input_ids: Tensor | None, position_ids: Tensor, token_type_ids: Tensor, word_weight: Tensor,
    position_weight: Tensor, type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float,
    dropout_p: float, training: bool, inputs_embeds: Tensor | None = None, padding_idx: int | None = None,
) -> Tensor:
    """dropout(LayerNorm(word + position + token-type embeddings)); see the module docstring.

    ``inputs_embeds`` replaces the word lookup (its gradient is dh itself).
    """
    words = word_weight if inputs_embeds is None else inputs_embeds
    if padding_idx is None:
        padding_idx = -1
    elif padding_idx < 0:
        padding_idx += word_weight.shape[0]  # as nn.Embedding
    seed = dropout.draw_seed(words.device) if training and dropout_p > 0.0 else None
    return _forward_op(
        None if inputs_embeds is not None else input_ids, position_ids, token_type_ids, words, position_weight,
        type_weight, ln_weight, ln_bias, seed, eps, dropout_p, padding_idx,
    )[0]


_KERNEL_NAMES = {_emb_fwd_kernel: "emb_fwd", _emb_bwd_kernel: "emb_bwd", _segment_sum_kernel: "emb_segment_sum",
                 _segment_carry_kernel: "emb_segment_carry"}


def aot_specs() -> list[AotSpec]:
    specs: dict[str, AotSpec] = {}
    for hidden, act, dt, tuned in aot_rows():
        if act != dt:
            continue  # under autocast the tables are fp32 parameters: the fp32 configuration
        ids = meta(4, dtype=torch.int64)
        tables = [meta(rows, hidden, dtype=dt) for rows in (30, 16, 2)]
        w, b, seed = meta(hidden, dtype=dt), meta(hidden, dtype=dt), meta(dtype=torch.int64)
        launches = record(_launch_forward, ids, ids, ids, *tables, w, b, seed, 1e-12, 0.1, 0)
        launches += record(_launch_backward, meta(4, hidden, dtype=dt), ids, ids, ids, *tables, w, meta(4),
                           meta(4), seed, 0.1, 0, [True, True, True])
        for launch in launches:  # backward scatters three tables with the same two kernels
            name = f"{_KERNEL_NAMES[launch.kernel]}[{row_tag(hidden, act, dt)}]"
            specs[name] = spec(name, launch, tuned=tuned)
    return list(specs.values())

"""Packed variable-length attention, forward / backward / both: bertfast against SDPA's backends."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bertfast import ops
from bertfast.bench.families.layernorm_family import DTYPES, dispatched_name, under_backend
from bertfast.bench.suite import Context, Entry, Group
from bertfast.padding import Packing

TITLE = "Packed attention"
NOTES = """\
Bidirectional attention of BERT's layers on a batch of sequences, as packed tokens (qkv of shape
(tokens, 3, heads, head_dim) with cu_seqlens) or as the padded (batch, heads, max_seqlen, head_dim)
view with a key-padding mask. "full" batches have every sequence max_seqlen long, "ragged" ones
lengths uniform in 50-100% of it.

Baselines: `bertfast[<backend>]` is `bertfast.ops.attention`, the entry the model calls, as dispatched
(the Triton kernels on a GPU; on a CPU the native kernels: the forward-only one in inference, the
training pair, which saves the log-sum-exp, when a gradient is recorded); `bertfast[triton]` on a CPU is
the same entry with the
Triton backend forced, run by the interpreter (correctness, not speed); `reference` is the same entry with
the `torch` backend forced (`bertfast.ops.use_backend`): it pads, runs SDPA with the key mask and unpacks;
`reference-compile` is it under `torch.compile`; `sdpa-<backend>` is `F.scaled_dot_product_attention` on the
padded batch held to one backend (a backend that refuses the inputs says so); `flash-attn` is
`flash_attn_varlen_qkvpacked_func` where flash-attn is installed. TFLOP/s count useful work only
(forward 4 * heads * head_dim * sum(len^2), backward 2.5x that), so padded baselines' wasted work
shows as lower throughput; "% peak" is of the device's measured dense matmul throughput for the
dtype; `max_err` is the largest difference of the output from the reference's.

"attention bias" groups: MPNet's relative-position bias (`bias_table`, 32 buckets x heads) on the
same packed batch. `<subject>+bias` is `bertfast.ops.attention` with the bias, `<subject>` the same call
without it (what the bias costs), `reference+bias` the reference with the bias (SDPA with a float
mask of (batch, heads, S, S)). Mode `inference` is the forward under `torch.inference_mode` (on a CPU:
the forward-only C++ kernel; with gradients recorded, the training kernels); backward includes the
table's gradient.
"""

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


class Batch:
    """One batch as packed tokens (qkv, cu_seqlens) and as its padded (B, heads, S, head_dim) view."""

    def __init__(self, lengths: list[int], max_seqlen: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.lengths, self.max_seqlen = lengths, max_seqlen
        lens = torch.tensor(lengths, device=device)
        mask = torch.arange(max_seqlen, device=device)[None, :] < lens[:, None]
        packing = Packing.from_mask(mask)
        self.cu_seqlens = packing.cu_seqlens
        qkv = torch.randn(packing.total, 3, heads, head_dim, device=device, dtype=dtype)
        self.qkv = qkv.requires_grad_()
        padded = packing.unpack(qkv.detach()).permute(2, 0, 3, 1, 4)  # (3, B, heads, S, head_dim)
        self.q, self.k, self.v = (t.contiguous().requires_grad_() for t in padded)
        self.key_mask = mask[:, None, None, :]
        self.heads, self.head_dim = heads, head_dim

    @property
    def forward_flops(self) -> float:
        return forward_flops(self.lengths, self.heads, self.head_dim)


def forward_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    return 4.0 * heads * head_dim * sum(n * n for n in lengths)


def make_lengths(max_seqlen: int, tokens: int, ragged: bool, generator: torch.Generator) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < tokens:
        low = max(1, max_seqlen // 2) if ragged else max_seqlen
        lengths.append(int(torch.randint(low, max_seqlen + 1, (), generator=generator)))
    return lengths


def _padded_to_packed(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, heads, S, head_dim) SDPA output -> (T, heads, head_dim) rows of the real tokens."""
    return out.transpose(1, 2)[batch.key_mask[:, 0, 0, :]]


def _flash_attn() -> Callable | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_qkvpacked_func

    return flash_attn_varlen_qkvpacked_func


def implementations(batch: Batch, ctx: Context, subject: str) -> dict[str, tuple[Callable[[], torch.Tensor], list]]:
    """name -> (forward returning the output, tensors whose gradients backward computes)."""
    packed, padded = [batch.qkv], [batch.q, batch.k, batch.v]
    args = (batch.qkv, batch.cu_seqlens, batch.max_seqlen)
    impls: dict[str, tuple[Callable[[], torch.Tensor], list]] = {subject: (lambda: ops.attention(*args), packed)}
    if ctx.interpreted_triton and subject != "bertfast[triton]":
        impls["bertfast[triton]"] = (lambda: under_backend("triton", ops.attention)(*args), packed)
    impls["reference"] = (lambda: under_backend("torch", ops.attention)(*args), packed)
    if ctx.compile:
        compiled = under_backend("torch", torch.compile(ops.attention))
        impls["reference-compile"] = (lambda: compiled(*args), packed)
    for name, backend in SDPA_BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(batch.q, batch.k, batch.v, attn_mask=batch.key_mask)
        impls[f"sdpa-{name}"] = (run, padded)
    flash = _flash_attn() if ctx.on_gpu else None
    if flash is not None:
        cu = batch.cu_seqlens.to(torch.int32)
        impls["flash-attn"] = (lambda: flash(batch.qkv, cu, batch.max_seqlen), packed)
    return impls


def _entries(batch: Batch, ctx: Context, subject: str) -> dict[str, Entry | str]:
    ref_out = under_backend("torch", ops.attention)(batch.qkv, batch.cu_seqlens, batch.max_seqlen).detach()
    entries: dict[str, Entry | str] = {}
    for name, (forward, inputs) in implementations(batch, ctx, subject).items():
        try:
            out = forward()
        except Exception as e:  # an SDPA backend that does not take these inputs
            lines = str(e).strip().splitlines() or [type(e).__name__]
            entries[name] = ("refused: " if name.startswith("sdpa-") else "failed: ") + lines[0][:100]
            continue
        packed_out = out if out.dim() == 3 else _padded_to_packed(out, batch)
        grad = torch.randn_like(out)
        info = {"max_err": (packed_out.float() - ref_out.float()).abs().max().item()}
        if name == "bertfast[triton]" and not ctx.on_gpu:
            info["interpreted"] = True
        entries[name] = Entry({
            "fwd": forward,
            "bwd": lambda out=out, inputs=inputs, grad=grad: torch.autograd.grad(out, inputs, grad, retain_graph=True),
            "fwd+bwd": lambda forward=forward, inputs=inputs, grad=grad: torch.autograd.grad(forward(), inputs, grad),
        }, info)
    return entries


def _group(max_seqlen: int, heads: int, head_dim: int, tokens: int, ragged: bool, dtype_name: str,
           ctx: Context) -> Group:
    lengths = make_lengths(max_seqlen, tokens, ragged, torch.Generator().manual_seed(0))
    subject = dispatched_name("attention", torch.empty(0, device=ctx.device))
    names = [subject]
    if ctx.interpreted_triton and subject != "bertfast[triton]":
        names.append("bertfast[triton]")
    names += ["reference"] + (["reference-compile"] if ctx.compile else [])
    names += [f"sdpa-{name}" for name in SDPA_BACKENDS] + (["flash-attn"] if ctx.on_gpu else [])

    def build() -> dict[str, Entry | str]:
        torch.manual_seed(0)
        batch = Batch(lengths, max_seqlen, heads, head_dim, DTYPES[dtype_name], ctx.device)
        return _entries(batch, ctx, subject)

    flops = forward_flops(lengths, heads, head_dim)
    kind = "ragged" if ragged else "full"
    shape = (f"{len(lengths)} x <={max_seqlen} {kind} ({sum(lengths)} tokens), {heads}x{head_dim} heads, "
             f"{dtype_name}")
    return Group(f"attention max_seqlen {max_seqlen}", shape, sum(lengths), "tokens", tuple(names), build, MODES,
                 {mode: factor * flops for mode, factor in FLOP_FACTOR.items()}, "TFLOP/s", dtype_name, subject,
                 info={"series": f"{heads} heads {kind} {dtype_name}"})


BIAS_MODES = ("inference", "fwd", "fwd+bwd")
BIAS_FLOP_FACTOR = {"inference": 1.0, "fwd": 1.0, "fwd+bwd": 3.5}


def _inference(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return fn()
    return run


def _bias_entries(batch: Batch, subject: str) -> dict[str, Entry | str]:
    table = torch.randn(32, batch.heads, device=batch.qkv.device).requires_grad_()
    args = (batch.qkv, batch.cu_seqlens, batch.max_seqlen)
    impls = {
        f"{subject}+bias": (lambda: ops.attention(*args, bias_table=table), [batch.qkv, table]),
        subject: (lambda: ops.attention(*args), [batch.qkv]),
        "reference+bias": (lambda: under_backend("torch", ops.attention)(*args, bias_table=table), [batch.qkv, table]),
    }
    ref_out = under_backend("torch", ops.attention)(*args, bias_table=table).detach()
    entries: dict[str, Entry | str] = {}
    for name, (forward, inputs) in impls.items():
        out = forward()
        grad = torch.randn_like(out)
        info = {"max_err": (out.detach().float() - ref_out.float()).abs().max().item()} if "bias" in name else {}
        entries[name] = Entry({
            "inference": _inference(forward),
            "fwd": forward,
            "fwd+bwd": lambda forward=forward, inputs=inputs, grad=grad: torch.autograd.grad(forward(), inputs, grad),
        }, info)
    return entries


def _bias_group(max_seqlen: int, heads: int, head_dim: int, tokens: int, dtype_name: str, ctx: Context) -> Group:
    lengths = make_lengths(max_seqlen, tokens, True, torch.Generator().manual_seed(0))
    subject = dispatched_name("attention", torch.empty(0, device=ctx.device))
    names = (f"{subject}+bias", subject, "reference+bias")

    def build() -> dict[str, Entry | str]:
        torch.manual_seed(0)
        return _bias_entries(Batch(lengths, max_seqlen, heads, head_dim, DTYPES[dtype_name], ctx.device), subject)

    flops = forward_flops(lengths, heads, head_dim)
    shape = (f"{len(lengths)} x <={max_seqlen} ragged ({sum(lengths)} tokens), {heads}x{head_dim} heads, "
             f"{dtype_name}, 32 buckets")
    return Group(f"attention bias max_seqlen {max_seqlen}", shape, sum(lengths), "tokens", names, build,
                 BIAS_MODES, {mode: factor * flops for mode, factor in BIAS_FLOP_FACTOR.items()}, "TFLOP/s",
                 dtype_name, f"{subject}+bias", info={"series": f"{heads} heads bias {dtype_name}"})


def groups(ctx: Context) -> list[Group]:
    if ctx.quick:
        configs, dtypes = [(16, 2, 16, 32)], ["fp32"]
    elif ctx.on_gpu:
        configs = [(s, h, 64, t) for s in (128, 512) for h in (12, 16) for t in (4096, 16384)]
        dtypes = ["bf16"]
    else:
        configs, dtypes = [(128, 12, 64, t) for t in (512, 2048)], ["fp32"]
    unbiased = [_group(s, h, d, t, ragged, dtype, ctx) for s, h, d, t in configs for ragged in (False, True)
                for dtype in dtypes]
    return unbiased + [_bias_group(s, h, d, t, dtype, ctx) for s, h, d, t in configs for dtype in dtypes]

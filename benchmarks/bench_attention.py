"""Packed variable-length attention, forward / backward / both: bertfast's Triton kernel against SDPA.

    python benchmarks/bench_attention.py             # GPU: BERT shapes in bf16; CPU: one small fp32 shape
    python benchmarks/bench_attention.py --quick     # fewer shapes and repetitions
    python benchmarks/bench_attention.py --out benchmarks/results/attention_h100.json   # or .md

GPU shapes: max_seqlen 128 and 512, head_dim 64, 12 and 16 heads, ~16k tokens per batch, "full"
batches (every sequence max_seqlen long) and "ragged" ones (lengths uniform in 50-100% of max_seqlen).

Baselines, all on the same tokens:

  bertfast            the Triton kernels on the packed tokens (deterministic backward, the default)
  bertfast-atomic     the same with atomic dQ accumulation (``deterministic=False``)
  reference           bertfast.ops.reference.attention: pad, SDPA with the key mask, unpack
  reference-compile   the reference under torch.compile (GPU, or CPU with --compile)
  sdpa-<backend>      F.scaled_dot_product_attention on the padded (B, heads, S, head_dim) batch with its
                      key-padding mask, held to one backend (flash, efficient, cudnn, math) with
                      torch.nn.attention.sdpa_kernel; a backend that refuses the inputs is listed as such

Times are medians (CUDA events on a GPU). TFLOP/s count useful work only: forward
4 * heads * head_dim * sum(len_i^2), backward 2.5x that, so the padded baselines' wasted work shows
as lower throughput; percentages are of the H100 SXM dense bf16 peak (990 TFLOP/s). "max err" is the
largest difference of the output from the reference's.

On CPU the Triton kernels do not run (only under TRITON_INTERPRET, which measures nothing about
speed): the table compares the reference with SDPA's backends on one small shape, on one thread
unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_ms
from torch.nn.attention import SDPBackend, sdpa_kernel

from bertfast.ops import reference
from bertfast.padding import Packing

H100_BF16_TFLOPS = 990.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


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
        return 4.0 * self.heads * self.head_dim * sum(n * n for n in self.lengths)


def make_lengths(max_seqlen: int, tokens: int, ragged: bool, generator: torch.Generator) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < tokens:
        low = max(1, max_seqlen // 2) if ragged else max_seqlen
        lengths.append(int(torch.randint(low, max_seqlen + 1, (), generator=generator)))
    return lengths


def implementations(batch: Batch, compile_reference: bool) -> dict[str, tuple[Callable[[], torch.Tensor], list]]:
    """name -> (forward returning the output, tensors whose gradients backward computes)."""
    packed = [batch.qkv]
    padded = [batch.q, batch.k, batch.v]
    impls: dict[str, tuple[Callable[[], torch.Tensor], list]] = {}
    if batch.qkv.is_cuda:
        from bertfast.kernels.attention import flash_attention

        impls["bertfast"] = (lambda: flash_attention(batch.qkv, batch.cu_seqlens, batch.max_seqlen), packed)
        impls["bertfast-atomic"] = (
            lambda: flash_attention(batch.qkv, batch.cu_seqlens, batch.max_seqlen, deterministic=False), packed)
    impls["reference"] = (lambda: reference.attention(batch.qkv, batch.cu_seqlens, batch.max_seqlen), packed)
    if compile_reference:
        compiled = torch.compile(reference.attention)
        impls["reference-compile"] = (lambda: compiled(batch.qkv, batch.cu_seqlens, batch.max_seqlen), packed)
    for name, backend in SDPA_BACKENDS.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(batch.q, batch.k, batch.v, attn_mask=batch.key_mask)
        impls[f"sdpa-{name}"] = (run, padded)
    return impls


def padded_to_packed(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(B, heads, S, head_dim) SDPA output -> (T, heads, head_dim) rows of the real tokens."""
    return out.transpose(1, 2)[batch.key_mask[:, 0, 0, :]]


def measure(name: str, forward: Callable[[], torch.Tensor], inputs: list, batch: Batch, reps: int,
            ref_out: torch.Tensor) -> dict:
    device = batch.qkv.device
    row: dict = {"impl": name}
    try:
        out = forward()
    except Exception as e:  # an SDPA backend that does not take these inputs, or a compile failure
        lines = str(e).strip().splitlines() or [type(e).__name__]
        row["status"] = ("refused: " if name.startswith("sdpa-") else "failed: ") + lines[0][:90]
        return row
    packed_out = out if out.dim() == 3 else padded_to_packed(out, batch)
    row["max_err"] = (packed_out.float() - ref_out.float()).abs().max().item()
    grad = torch.randn_like(out)

    def forward_backward():
        torch.autograd.grad(forward(), inputs, grad)

    row["fwd_ms"] = median_ms(forward, device, reps)
    row["bwd_ms"] = median_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), device, reps)
    row["fwd_bwd_ms"] = median_ms(forward_backward, device, reps)
    flops = batch.forward_flops
    for key, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)):
        row[f"{key}_tflops"] = factor * flops / (row[f"{key}_ms"] * 1e-3) / 1e12
    row["status"] = "ok"
    return row


def run_shape(max_seqlen: int, heads: int, head_dim: int, tokens: int, ragged: bool, dtype: torch.dtype,
              device: torch.device, reps: int, compile_reference: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    lengths = make_lengths(max_seqlen, tokens, ragged, generator)
    batch = Batch(lengths, max_seqlen, heads, head_dim, dtype, device)
    ref_out = reference.attention(batch.qkv, batch.cu_seqlens, max_seqlen).detach()
    rows = [measure(name, fwd, inputs, batch, reps, ref_out)
            for name, (fwd, inputs) in implementations(batch, compile_reference).items()]
    base = next((r for r in rows if r["impl"] == "reference" and r["status"] == "ok"), None)
    for r in rows:
        if base is not None and r["status"] == "ok":
            r["speedup_fwd_bwd"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return {
        "max_seqlen": max_seqlen, "heads": heads, "head_dim": head_dim, "batch": len(lengths),
        "tokens": sum(lengths), "padded_tokens": len(lengths) * max_seqlen,
        "lengths": "ragged 50-100%" if ragged else "full", "rows": rows,
    }


def shape_title(shape: dict) -> str:
    return (f"max_seqlen {shape['max_seqlen']}, {shape['heads']} heads x {shape['head_dim']}, {shape['lengths']}: "
            f"{shape['batch']} sequences, {shape['tokens']} tokens ({shape['padded_tokens']} padded)")


def _tflops(value: float, on_gpu: bool) -> str:
    return f"{value:.1f} ({100 * value / H100_BF16_TFLOPS:.0f}%)" if on_gpu else f"{value:.4f}"


def format_table(shape: dict, on_gpu: bool) -> list[list[str]]:
    header = ["impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s", "bwd TFLOP/s", "fwd+bwd TFLOP/s",
              "vs reference", "max err", "status"]
    lines = [header]
    for r in shape["rows"]:
        if r["status"] != "ok":
            lines.append([r["impl"], *["-"] * 8, r["status"]])
            continue
        lines.append([
            r["impl"], f"{r['fwd_ms']:.3f}", f"{r['bwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}",
            *(_tflops(r[f"{key}_tflops"], on_gpu) for key in ("fwd", "bwd", "fwd_bwd")),
            f"{r['speedup_fwd_bwd']:.2f}x" if "speedup_fwd_bwd" in r else "-", f"{r['max_err']:.1e}", "ok",
        ])
    return lines


def markdown(report: dict) -> str:
    out = [f"# Attention benchmark: {report['device']}, {report['dtype']}", "", report["note"], ""]
    for shape in report["shapes"]:
        lines = format_table(shape, report["on_gpu"])
        out += [f"## {shape_title(shape)}", "", "| " + " | ".join(lines[0]) + " |",
                "|" + "---|" * len(lines[0])]
        out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--tokens", type=int, help="tokens per batch (default: 16384 on a GPU, 512 on CPU)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="time the reference under torch.compile on CPU")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out on a GPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: spinning worker threads on shared cores ruin the timings)")
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .md for tables)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    if on_gpu:
        seqlens, head_counts, tokens = (128, 512), (12, 16), args.tokens or 16384
        reps = 10 if args.quick else 30
        if args.quick:
            head_counts = (12,)
        compile_reference = not args.no_compile
        note = "Triton kernels on the GPU; TFLOP/s count useful (unpadded) work."
    else:
        seqlens, head_counts, tokens = (64,), (4,), args.tokens or 512
        torch.set_num_threads(args.threads)
        reps = 5 if args.quick else 15
        compile_reference = args.compile
        note = (f"CPU, {args.threads} thread(s): the Triton kernels are not timed (they run on CPU only under "
                "TRITON_INTERPRET, which says nothing about speed); reference and SDPA backends only.")
    torch.manual_seed(0)
    shapes = []
    for max_seqlen in seqlens:
        for heads in head_counts:
            for ragged in (False, True):
                shape = run_shape(max_seqlen, heads, args.head_dim, tokens, ragged, dtype, device, reps,
                                  compile_reference)
                shapes.append(shape)
                print(f"\n{shape_title(shape)}")
                lines = format_table(shape, on_gpu)
                widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
                for line in lines:
                    print("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1])
    print(f"\n{note}")
    name = torch.cuda.get_device_name() if on_gpu else "CPU"
    report = {"device": name, "on_gpu": on_gpu, "dtype": str(dtype).removeprefix("torch."),
              "torch": torch.__version__, "note": note, "shapes": shapes}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(report) if args.out.suffix == ".md" else json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

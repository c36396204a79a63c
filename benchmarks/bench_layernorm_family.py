"""The LayerNorm-GELU family: forward / backward / both, bertfast against the PyTorch reference.

    python benchmarks/bench_layernorm_family.py            # GPU: BERT shapes; CPU: one small fp32 shape
    python benchmarks/bench_layernorm_family.py --quick    # fewer shapes and repetitions
    python benchmarks/bench_layernorm_family.py --out benchmarks/results/layernorm_h100.json   # or .md

Ops (as BERT runs them in training; dropout p = 0.1 where the op has dropout):

  embeddings                  dropout(LayerNorm(word[ids] + position[pos] + type[tt])), vocab 30522
  bias_gelu                   gelu(x + bias) on the (tokens, 4 * hidden) intermediate activation
  bias_dropout_add_layernorm  LayerNorm(dropout(x + bias) + residual)
  bias_gelu_layernorm         LayerNorm(gelu(x + bias))

GPU shapes: 4k, 16k and 64k tokens, hidden 768 and 1024, bf16 and fp32. Baselines:

  bertfast[<backend>]  the op as bertfast dispatches it: on a GPU the Triton kernels; on CPU the native
                       C++ kernel (bias_gelu, fp32) or the reference itself, as the label says
  reference            bertfast.ops.reference in eager PyTorch
  reference-compile    the reference under torch.compile (GPU by default; CPU with --compile)

Times are medians (CUDA events on a GPU). GB/s counts the bytes an ideal fused kernel must move
(tokens x width elements): forward reads the inputs and writes the output; backward reads dy and
what the forward inputs it needs, and writes their gradients. Per op, in tensors of (tokens, width):
embeddings 2 fwd (gathered word rows, y) and 2 bwd (dy, gathered rows) plus the dense word-table
gradient; bias_gelu 2 / 3; bias_dropout_add_layernorm 3 / 5; bias_gelu_layernorm 2 / 3. The percentage
is of the H100 SXM HBM3 bandwidth (3.35 TB/s).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timing import median_ms

from bertfast import ops
from bertfast.ops import reference

H100_TBPS = 3.35
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILIES = ("embeddings", "bias_gelu", "bias_dropout_add_layernorm", "bias_gelu_layernorm")
VOCAB, MAX_POSITIONS, TYPES, DROPOUT, EPS = 30522, 512, 2, 0.1, 1e-12
# (forward, backward) tensors of (tokens, width) an ideal kernel moves; see the module docstring.
TRAFFIC = {
    "embeddings": (2, 2),
    "bias_gelu": (2, 3),
    "bias_dropout_add_layernorm": (3, 5),
    "bias_gelu_layernorm": (2, 3),
}


@dataclass
class Case:
    """One op at one shape: the tensors to differentiate and how to call an implementation on them."""

    family: str
    tokens: int
    hidden: int
    dtype: torch.dtype
    inputs: list[torch.Tensor]
    call: Callable[[Callable], torch.Tensor]

    @property
    def width(self) -> int:
        return 4 * self.hidden if self.family == "bias_gelu" else self.hidden

    def bytes_moved(self, mode: str) -> float:
        element = torch.finfo(self.dtype).bits // 8
        fwd, bwd = TRAFFIC[self.family]
        extra_bwd = VOCAB * self.hidden if self.family == "embeddings" else 0  # dense word-table gradient
        per_mode = {
            "fwd": fwd * self.tokens * self.width,
            "bwd": bwd * self.tokens * self.width + extra_bwd,
            "fwd+bwd": (fwd + bwd) * self.tokens * self.width + extra_bwd,
        }
        return per_mode[mode] * element


def make_case(family: str, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> Case:
    def param(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    if family == "embeddings":
        ids = torch.randint(0, VOCAB, (tokens,), device=device)
        positions = torch.arange(tokens, device=device) % 128  # sequences of 128 tokens
        types = (positions >= 64).long()
        inputs = [param(VOCAB, hidden), param(MAX_POSITIONS, hidden), param(TYPES, hidden),
                  param(hidden, scale=0.1), param(hidden, scale=0.1)]
        return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(
            ids, positions, types, *inputs, EPS, DROPOUT, True, padding_idx=0))
    if family == "bias_gelu":
        inputs = [param(tokens, 4 * hidden), param(4 * hidden)]
        return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(*inputs))
    if family == "bias_dropout_add_layernorm":
        inputs = [param(tokens, hidden), param(hidden), param(tokens, hidden), param(hidden), param(hidden)]
        return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(*inputs, EPS, DROPOUT, True))
    inputs = [param(tokens, hidden), param(hidden), param(hidden), param(hidden)]
    return Case(family, tokens, hidden, dtype, inputs, lambda fn: fn(*inputs, EPS))


def time_modes(case: Case, impl: Callable, reps: int, device: torch.device) -> dict[str, float]:
    y = case.call(impl)
    dy = torch.randn_like(y)
    return {
        "fwd": median_ms(lambda: case.call(impl), device, reps),
        "bwd": median_ms(lambda: torch.autograd.grad(y, case.inputs, dy, retain_graph=True), device, reps),
        "fwd+bwd": median_ms(lambda: torch.autograd.grad(case.call(impl), case.inputs, dy), device, reps),
    }


def baselines(family: str, like: torch.Tensor, compile_reference: bool) -> dict[str, Callable]:
    backend, fn = ops.implementation(family, like)
    impls = {f"bertfast[{backend}]": fn, "reference": getattr(reference, family)}
    if compile_reference:
        impls["reference-compile"] = torch.compile(getattr(reference, family))
    return impls


def run(args: argparse.Namespace, device: torch.device) -> list[dict]:
    on_gpu = device.type == "cuda"
    if on_gpu:
        shapes = [(16384, 768), (16384, 1024)] if args.quick else [
            (t, h) for t in (4096, 16384, 65536) for h in (768, 1024)]
        dtypes = args.dtype or ["bf16", "fp32"]
    else:
        shapes = [(512, 768)] if args.quick else [(1024, 768)]
        dtypes = args.dtype or ["fp32"]
    reps = args.reps or ((10 if args.quick else 30) if on_gpu else (3 if args.quick else 10))
    compile_reference = args.compile or (on_gpu and not args.no_compile)
    rows = []
    for family in args.ops or FAMILIES:
        for tokens, hidden in shapes:
            for dtype_name in dtypes:
                torch.manual_seed(0)
                case = make_case(family, tokens, hidden, DTYPES[dtype_name], device)
                for name, impl in baselines(family, case.inputs[0], compile_reference).items():
                    try:
                        times = time_modes(case, impl, reps, device)
                    except Exception as e:  # e.g. torch.compile without a working C++ toolchain
                        print(f"{family} {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                        continue
                    for mode, ms in times.items():
                        gbps = case.bytes_moved(mode) / (ms * 1e-3) / 1e9
                        rows.append({
                            "op": family, "tokens": tokens, "hidden": hidden, "dtype": dtype_name,
                            "baseline": name, "mode": mode, "ms": ms, "GB/s": gbps,
                            "pct_peak": 100 * gbps / (H100_TBPS * 1000) if on_gpu else None,
                        })
    for row in rows:
        ref = next(r["ms"] for r in rows if r["baseline"] == "reference" and all(
            r[k] == row[k] for k in ("op", "tokens", "hidden", "dtype", "mode")))
        row["speedup_vs_reference"] = ref / row["ms"]
    return rows


def table(rows: list[dict]) -> list[str]:
    header = ["op", "tokens", "hidden", "dtype", "mode", "baseline", "ms", "GB/s", "% peak", "x reference"]
    lines = [header]
    for r in rows:
        pct = f"{r['pct_peak']:.1f}" if r["pct_peak"] is not None else "-"
        lines.append([r["op"], str(r["tokens"]), str(r["hidden"]), r["dtype"], r["mode"], r["baseline"],
                      f"{r['ms']:.3f}", f"{r['GB/s']:.1f}", pct, f"{r['speedup_vs_reference']:.2f}"])
    return lines


def markdown(report: dict) -> str:
    lines = table(report["rows"])
    out = [f"# LayerNorm-GELU family on {report['device']}", "", f"torch {report['torch']}", "",
           "| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--ops", nargs="+", choices=FAMILIES, help="only these ops")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: bf16 fp32 on GPU, fp32 on CPU")
    parser.add_argument("--reps", type=int, help="timed repetitions per measurement")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the reference on CPU")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out on a GPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: steadier on a shared machine than OpenMP spin-waits)")
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .md for the table)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(device_name)
    if device.type == "cpu":
        print("On CPU the Triton kernels do not run: bertfast[...] is the native kernel or the reference,\n"
              "as its label says, and GB/s are not compared with a GPU peak.")
    rows = run(args, device)
    lines = table(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.rjust(w) if i >= 6 else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(line, widths, strict=True))))
    if args.out:
        report = {"device": device_name, "torch": torch.__version__, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(report) if args.out.suffix == ".md" else json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""MLM + NSP pretraining head, forward + backward: every position vs the masked rows vs the fused loss.

    python benchmarks/bench_mlm_head.py                  # CPU: fp32, 8x128 and 2x512 (~1-2 minutes)
    python benchmarks/bench_mlm_head.py --quick          # CPU: one shape, fewer steps (< 1 minute)
    python benchmarks/bench_mlm_head.py --compile        # CPU: also the torch.compile baselines (slow)
    python benchmarks/bench_mlm_head.py --threads 1      # CPU shared with other work: see below
    python benchmarks/bench_mlm_head.py --out benchmarks/results/mlm_head_cpu.json   # or .md
    python benchmarks/bench_mlm_head.py --op-rows 614,4000 --shapes ""   # only the op, at MLM row counts

On a GPU the defaults are BERT-base pretraining: 32x128 and 8x512 under bf16 autocast, with the
torch.compile baselines (--no-compile leaves them out).

Head baselines, on the same sequence output, pooled output and labels (15% of positions masked;
the masked positions' indices are computed once, outside the timed step, as a data loader would):

  all-positions   transformers' BertPreTrainingHeads: transform + decoder over every position, then
                  cross-entropy with ignore_index (what transformers' BertForPreTraining does)
  masked-torch    plain PyTorch on the masked rows only: gather, the same head, F.cross_entropy
  masked-compile  masked-torch under torch.compile (GPU, or CPU with --compile)
  bertfast        gather, the same transform, then bertfast's fused linear cross-entropy (the Triton
                  kernel on GPU, the chunked torch version on CPU)
  liger           Liger-Kernel's fused linear cross-entropy in place of bertfast's (GPU, if installed)

The op section times linear_cross_entropy alone (hidden 768, vocab 30522): the reference, the
reference under torch.compile, and bertfast's version, with TFLOP/s of its three matmuls on a GPU.
Times are medians; peak memory is what a step allocates beyond its inputs and parameters (on CPU:
peak resident memory, with large allocations returned to the OS at once so that it tracks tensors).
On a CPU busy with other work, small multi-threaded ops wait for descheduled OpenMP threads (an
index_add_ of 154 rows: 0.02 ms on one thread, ~80 ms on two); --threads 1 keeps that noise out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bertfast.kernels import cross_entropy as ce
from bertfast.ops import reference

HIDDEN, VOCAB, IGNORE = 768, 30522, -100
H100_BF16_TFLOPS = 990.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIONAL = ("masked-compile", "reference-compile", "liger")  # baselines that may fail to run here
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class PeakMemory:
    """Bytes a step allocates beyond what exists before it: CUDA allocator stats, or on CPU the
    process's peak resident set (reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    @staticmethod
    def _proc_status(key: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024

    def measure(self, step: Callable[[], None]) -> float:
        """Peak MB above the starting point while ``step`` runs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        # While measuring, allocations above 1 MB are mmap-ed, so that freeing a tensor lowers the
        # resident set at once, and malloc's cached free pages are handed back first: the resident
        # set then follows the live tensors. Afterwards: glibc's usual 32 MB threshold.
        self.libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set to the current one
        base = self._proc_status("VmRSS")
        step()
        peak = self._proc_status("VmHWM") - base
        self.libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        return peak / 2**20


def timed_ms(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms): on a shared CPU the CPU time says more than the wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start), 1000 * (time.process_time() - start_cpu)


def fused_loss(device: torch.device) -> tuple[str, Callable]:
    if device.type == "cuda":
        return "triton", ce.linear_cross_entropy
    return "torch chunked", ce.linear_cross_entropy_torch


def liger_loss() -> Callable | None:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)

    def loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cuda"):  # its matmuls take one dtype, as bertfast's op casts itself
            dtype = torch.get_autocast_dtype("cuda")
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        return module(weight, x, labels, bias)

    return loss


def head_steps(batch: int, seq: int, device: torch.device, mask_prob: float, compile_: bool):
    """{name: step returning the loss} for one batch shape, and the number of masked rows."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertPreTrainingHeads

    config = BertConfig(hidden_size=HIDDEN, vocab_size=VOCAB)
    torch.manual_seed(0)
    heads = BertPreTrainingHeads(config).to(device).train()
    g = torch.Generator().manual_seed(0)
    sequence = torch.randn(batch, seq, HIDDEN, generator=g).to(device).requires_grad_()
    pooled = torch.randn(batch, HIDDEN, generator=g).to(device).requires_grad_()
    n_masked = round(mask_prob * batch * seq)
    masked = torch.randperm(batch * seq, generator=g)[:n_masked].sort().values
    labels = torch.full((batch * seq,), IGNORE)
    labels[masked] = torch.randint(0, VOCAB, (n_masked,), generator=g)
    labels, masked = labels.to(device), masked.to(device)
    masked_labels = labels[masked]
    nsp = torch.randint(0, 2, (batch,), generator=g).to(device)
    decoder = heads.predictions.decoder

    def nsp_loss() -> torch.Tensor:
        return F.cross_entropy(heads.seq_relationship(pooled), nsp)

    def rows() -> torch.Tensor:
        return sequence.reshape(-1, HIDDEN).index_select(0, masked)

    def all_positions() -> torch.Tensor:
        scores, nsp_scores = heads(sequence, pooled)
        return F.cross_entropy(scores.view(-1, VOCAB), labels) + F.cross_entropy(nsp_scores, nsp)

    def masked_torch() -> torch.Tensor:
        return F.cross_entropy(heads.predictions(rows()), masked_labels) + nsp_loss()

    def with_loss(loss_fn: Callable) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            x = heads.predictions.transform(rows())
            loss = loss_fn(x, decoder.weight, decoder.bias, masked_labels)
            return (loss[0] if isinstance(loss, tuple) else loss) + nsp_loss()
        return step

    steps = {"all-positions": all_positions, "masked-torch": masked_torch}
    if compile_:
        steps["masked-compile"] = torch.compile(masked_torch)
    steps["bertfast"] = with_loss(fused_loss(device)[1])
    liger = liger_loss() if device.type == "cuda" else None
    if liger is not None:
        steps["liger"] = with_loss(liger)
    leaves = [sequence, pooled, *heads.parameters()]
    return steps, leaves, n_masked


def op_steps(n_rows: int, device: torch.device, dtype: torch.dtype, compile_: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows, HIDDEN, generator=g).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(VOCAB, HIDDEN, generator=g)).to(device, dtype).requires_grad_()
    bias = torch.zeros(VOCAB, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (n_rows,), generator=g).to(device)
    fns = {"reference": reference.linear_cross_entropy}
    if compile_:
        fns["reference-compile"] = torch.compile(reference.linear_cross_entropy)
    name, fn = fused_loss(device)
    fns[f"bertfast ({name})"] = fn
    steps = {k: (lambda f=f: f(x, weight, bias, labels)[0]) for k, f in fns.items()}
    return steps, [x, weight, bias]


def run_steps(steps: dict, leaves: list, device, autocast_dtype, iters: int, warmup: int, memory: PeakMemory):
    """Median ms, peak MB and loss of each step. The steps take turns, round after round, so that
    a machine shared with other work slows them alike."""
    runnable, losses = {}, {}
    for name, loss_step in steps.items():

        def step(name=name, loss_step=loss_step) -> None:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = loss_step()
            loss.backward()
            losses[name] = loss.item()
            for t in leaves:
                t.grad = None

        try:
            for _ in range(warmup):
                step()
        except Exception as error:
            if name not in OPTIONAL:
                raise
            print(f"  {name}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
            continue
        runnable[name] = step
    times = {name: [] for name in runnable}
    for _ in range(iters):
        for name, step in runnable.items():
            times[name].append(timed_ms(step, device))
    results = {}
    for name, step in runnable.items():
        wall, cpu = zip(*times[name], strict=True)
        results[name] = {"ms": statistics.median(wall), "cpu_ms": statistics.median(cpu),
                         "peak_mb": memory.measure(step), "loss": losses[name]}
    return results


def print_table(title: str, results: dict, base: str, flops: float | None, on_gpu: bool) -> None:
    print(title)
    extra = f" {'TFLOP/s':>8s} {'% peak':>7s}" if flops and on_gpu else ""
    print(f"  {'':24s} {'ms':>9s} {'CPU ms':>9s} {'peak MB':>8s} {'loss':>8s} {'speed-up':>9s} {'memory':>7s}"
          + extra)
    ref = results[base]
    for name, r in results.items():
        line = (f"  {name:24s} {r['ms']:9.1f} {r['cpu_ms']:9.1f} {r['peak_mb']:8.0f} {r['loss']:8.4f} "
                f"{ref['ms'] / r['ms']:8.2f}x {r['peak_mb'] / max(ref['peak_mb'], 1e-9):6.2f}x")
        if flops and on_gpu:
            tflops = flops / r["ms"] / 1e9
            line += f" {tflops:8.1f} {100 * tflops / H100_BF16_TFLOPS:6.1f}%"
        print(line)


def markdown(report: dict) -> str:
    lines = [f"# MLM head, forward + backward ({report['device']}, {report['dtype']}, "
             f"load average {report['load_average']:.1f})", ""]
    for section in report["sections"]:
        lines += [f"## {section['title']}", "", "| | ms | CPU ms | peak MB | loss | speed-up | memory |",
                  "|---|---|---|---|---|---|---|"]
        base = section["results"][section["base"]]
        for name, r in section["results"].items():
            lines.append(f"| {name} | {r['ms']:.1f} | {r['cpu_ms']:.1f} | {r['peak_mb']:.0f} | "
                         f"{r['loss']:.4f} | {base['ms'] / r['ms']:.2f}x | "
                         f"{r['peak_mb'] / max(base['peak_mb'], 1e-9):.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=None, help="batch x seq list (default: 32x128,8x512 on GPU, "
                        "8x128,2x512 on CPU; empty for none)")
    parser.add_argument("--op-rows", default=None, help="row counts for the op section (default: 614; "
                        "empty for none)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--mask-prob", type=float, default=0.15)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="one shape, fewer steps")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the torch.compile baselines (default: on GPU only)")
    parser.add_argument("--out", type=Path, help="write the results here (.json, or .md for a table)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    autocast_dtype = None if dtype == torch.float32 else dtype
    shapes = args.shapes if args.shapes is not None else ("32x128,8x512" if on_gpu else "8x128,2x512")
    if args.quick and args.shapes is None:
        shapes = shapes.split(",")[0]
    op_rows = args.op_rows if args.op_rows is not None else "614"
    iters = args.iters or (20 if on_gpu else (2 if args.quick else 3))
    warmup = 3 if on_gpu else 1
    compile_ = on_gpu if args.compile is None else args.compile
    memory = PeakMemory(device)
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    # On a shared machine other work slows every baseline; the load says how much to trust the times.
    load = os.getloadavg()[0]
    print(f"{device_name}, {str(dtype).removeprefix('torch.')}, hidden {HIDDEN}, vocab {VOCAB}, "
          f"median of {iters} steps, load average {load:.1f}")

    sections = []
    for shape in filter(None, shapes.split(",")):
        batch, seq = (int(v) for v in shape.lower().split("x"))
        steps, leaves, n_masked = head_steps(batch, seq, device, args.mask_prob, compile_)
        results = run_steps(steps, leaves, device, autocast_dtype, iters, warmup, memory)
        title = f"head {batch}x{seq} ({batch * seq} positions, {n_masked} masked)"
        print_table(title, results, "all-positions", None, on_gpu)
        sections.append({"title": title, "base": "all-positions", "results": results})
    for n_rows in (int(v) for v in filter(None, op_rows.split(","))):
        steps, leaves = op_steps(n_rows, device, dtype, compile_)
        results = run_steps(steps, leaves, device, None, iters, warmup, memory)
        title = f"linear_cross_entropy, {n_rows} rows"
        print_table(title, results, "reference", 3 * 2 * n_rows * HIDDEN * VOCAB, on_gpu)
        sections.append({"title": title, "base": "reference", "results": results})

    if args.out:
        report = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype), "iters": iters,
                  "load_average": load, "sections": sections}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(report) if args.out.suffix == ".md" else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

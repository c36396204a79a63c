"""Sweep the Triton kernels' launch configurations on a GPU: which one is fastest at BERT shapes.

    python benchmarks/tune_kernels.py                          # attention and the LayerNorm family
    python benchmarks/tune_kernels.py --family attention --out benchmarks/results/<dir>/tuning.md

The launchers pick their configurations from fixed tables (``bertfast.kernels.attention.CONFIGS``;
``row_config``, ``partial_programs`` and bias+GELU's tile in ``bertfast.kernels``), so training never
autotunes at run time. This script measures the alternatives on the GPU at hand and prints, per
table entry, the shipped configuration next to the fastest candidate. A winner goes into a table
only once ``python -m bertfast.kernels.check`` shows it spill-free for every architecture that table
serves (the check fails otherwise).

  attention   bf16, head_dim 64, 12 heads, ~16k tokens, dropout 0.1 (training), deterministic backward;
              per table entry (max_seqlen 128 and 512): forward tiles x warps x stages, then backward
              ones; each timed on a full and a ragged batch (lengths 50-100% of the maximum), ranked by
              the sum. TFLOP/s count useful work (forward 4 * heads * head_dim * sum(len^2), backward 2.5x).
  layernorm   bf16, 16k tokens, hidden 768 and 1024, training (dropout 0.1): warps per row for the
              row kernels (forward and backward share them), programs per SM for the backward's
              partial sums, and bias+GELU's rows per tile and warps; GB/s as `bertfast bench layernorm-family`
              counts them, % of the H100's 3.35 TB/s.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from bertfast import ops
from bertfast.bench.families.attention import Batch, make_lengths
from bertfast.bench.families.layernorm_family import make_case
from bertfast.bench.timing import median_ms
from bertfast.kernels import attention as attn
from bertfast.kernels import bias_dropout_add_layernorm, bias_gelu, bias_gelu_layernorm, embeddings

HEADS, HEAD_DIM, TOKENS, DROPOUT = 12, 64, 16384, 0.1
H100_TBPS = 3.35  # H100 SXM HBM3 bandwidth, the reference of the "% peak" columns
FWD_CANDIDATES = [attn.FwdConfig(m, n, w, s) for (m, n) in ((64, 64), (64, 128), (128, 64), (128, 128))
                  for w in (4, 8) for s in (2, 3, 4)]
BWD_CANDIDATES = [attn.BwdConfig(m1, n1, n2, w, s)
                  for (m1, n1, n2) in ((16, 64, 32), (32, 64, 32), (64, 64, 64), (16, 128, 32), (32, 128, 32),
                                       (32, 128, 64))
                  for w in (4, 8) for s in (1, 2, 3)]
ROW_MODULES = (bias_dropout_add_layernorm, bias_gelu_layernorm, embeddings)  # the one-row-per-program kernels
ROW_WARPS = (1, 2, 4, 8, 16)
PROGRAMS_PER_SM = (1, 2, 4, 8, 16)
GELU_TILES = [(block_m, warps) for block_m in (1, 2, 4, 8) for warps in (2, 4, 8)]  # rows x 1024 columns


@dataclass(frozen=True)
class Sweep:
    """What to measure: the GPU defaults are BERT's shapes; the tests shrink them to run in the interpreter."""

    device: torch.device
    reps: int = 20
    tokens: int = TOKENS
    seqlens: tuple[int, ...] = (attn.SHORT_SEQLEN, 512)
    hiddens: tuple[int, ...] = (768, 1024)
    fwd_candidates: tuple[attn.FwdConfig, ...] = tuple(FWD_CANDIDATES)
    bwd_candidates: tuple[attn.BwdConfig, ...] = tuple(BWD_CANDIDATES)
    row_warps: tuple[int, ...] = ROW_WARPS
    programs_per_sm: tuple[int, ...] = PROGRAMS_PER_SM
    gelu_tiles: tuple[tuple[int, int], ...] = tuple(GELU_TILES)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32  # the interpreter's bf16 dot is wrong

    @property
    def sms(self) -> int:
        cuda = self.device.type == "cuda"
        return torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 1


def _time(fn: Callable[[], object], sweep: Sweep) -> float | None:
    """Median ms, or None when the configuration cannot run here (too much shared memory, ...)."""
    try:
        return median_ms(fn, sweep.device, sweep.reps)
    except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
        print(f"    skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return None


# ------------------------------------------------------------------------------------------------ attention


def _attention_batches(max_seqlen: int, sweep: Sweep) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    return [Batch(make_lengths(max_seqlen, sweep.tokens, ragged, generator), max_seqlen, HEADS, HEAD_DIM,
                  sweep.dtype, sweep.device) for ragged in (False, True)]


def _attention_step(batch: Batch, fwd: attn.FwdConfig | None, bwd: attn.BwdConfig | None,
                    shipped: tuple[attn.FwdConfig, attn.BwdConfig]) -> Callable[[], object]:
    """Forward (``fwd``) or backward (``bwd``) alone, with the other one's shipped configuration."""
    qkv, cu, max_seqlen = batch.qkv.detach(), batch.cu_seqlens, batch.max_seqlen
    scale, seed = 1.0 / math.sqrt(HEAD_DIM), torch.tensor(1234, device=qkv.device)
    if bwd is None:
        return lambda: attn._forward(qkv, cu, max_seqlen, scale, DROPOUT, seed, fwd)
    out, lse = attn._forward(qkv, cu, max_seqlen, scale, DROPOUT, seed, shipped[0])
    dout = torch.randn_like(out)
    return lambda: attn._backward(dout, qkv, out, lse, cu, max_seqlen, scale, DROPOUT, seed, bwd, True)


def tune_attention(sweep: Sweep) -> list[str]:
    table = attn._table(sweep.device)
    lines = [f"## attention (table {table}; {sweep.dtype}, head_dim {HEAD_DIM}, {HEADS} heads, {sweep.tokens} tokens, "
             f"dropout {DROPOUT})", "",
             "| max_seqlen | pass | configuration | ms full + ragged | TFLOP/s full | TFLOP/s ragged | |",
             "|---|---|---|---|---|---|---|"]
    for max_seqlen in sweep.seqlens:
        batches = _attention_batches(max_seqlen, sweep)
        shipped = attn.select_configs(sweep.device, HEAD_DIM, max_seqlen)
        for pass_, candidates, factor in (("fwd", sweep.fwd_candidates, 1.0), ("bwd", sweep.bwd_candidates, 2.5)):
            results = []
            for cfg in candidates:
                print(f"attention max_seqlen={max_seqlen} {pass_} {cfg}")
                fwd, bwd = (cfg, None) if pass_ == "fwd" else (None, cfg)
                times = [_time(_attention_step(b, fwd, bwd, shipped), sweep) for b in batches]
                if None not in times:
                    results.append((sum(times), cfg, times))
            results.sort(key=lambda r: r[0])
            current = shipped[0] if pass_ == "fwd" else shipped[1]
            picks = [r for r in results if r[1] == current][:1] + results[:1]
            for total, cfg, times in picks:
                tflops = [factor * b.forward_flops / (t * 1e-3) / 1e12 for b, t in zip(batches, times, strict=True)]
                label = "shipped" if cfg == current else "fastest"
                lines.append(f"| {max_seqlen} | {pass_} | {cfg} | {total:.3f} | {tflops[0]:.0f} | {tflops[1]:.0f} "
                             f"| {label} |")
    return lines


# ------------------------------------------------------------------------------------------------ layernorm


@contextmanager
def _row_knobs(sms: int, warps: int | None = None, programs_per_sm: int | None = None,
               gelu_tile: tuple[int, int] | None = None) -> Iterator[None]:
    """Run the LayerNorm-family launchers with other warps / partial-sum programs / bias+GELU tiles."""
    saved = [(m, name, getattr(m, name)) for m in (*ROW_MODULES, bias_gelu)
             for name in ("row_config", "partial_programs", "_tile_config", "_NUM_WARPS") if hasattr(m, name)]
    for module, name, original in saved:
        if name == "row_config" and warps is not None:
            setattr(module, name, lambda hidden, original=original: (original(hidden)[0], warps))
        if name == "partial_programs" and programs_per_sm is not None:
            setattr(module, name, lambda n, device, share=1: max(1, min(n, sms * programs_per_sm // share)))
        if name == "_tile_config" and gelu_tile is not None:
            setattr(module, name, lambda n_cols, original=original: (gelu_tile[0], original(n_cols)[1]))
        if name == "_NUM_WARPS" and gelu_tile is not None:
            setattr(module, name, gelu_tile[1])
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def _family_times(family: str, hidden: int, sweep: Sweep, **knobs) -> dict:
    """{"fwd": ms, "bwd": ms (None where the setting cannot run), "case": the Case measured}."""
    torch.manual_seed(0)
    case = make_case(family, sweep.tokens, hidden, sweep.dtype, sweep.device)
    op = getattr(ops, family)
    with _row_knobs(sweep.sms, **knobs), ops.use_backend("triton"):
        y = case.call(op)
        dy = torch.randn_like(y)
        return {
            "fwd": _time(lambda: case.call(op), sweep),
            "bwd": _time(lambda: torch.autograd.grad(y, case.inputs, dy, retain_graph=True), sweep),
            "case": case,
        }


def tune_layernorm(sweep: Sweep) -> list[str]:
    lines = [f"## LayerNorm family ({sweep.dtype}, {sweep.tokens} tokens, training)", "",
             "| op | hidden | knob | value | fwd ms | bwd ms | fwd % peak | bwd % peak | |",
             "|---|---|---|---|---|---|---|---|---|"]
    sweeps = [(family, "warps", [{"warps": w} for w in sweep.row_warps]) for family in
              ("bias_dropout_add_layernorm", "bias_gelu_layernorm", "embeddings")]
    sweeps += [(family, "programs_per_sm", [{"programs_per_sm": p} for p in sweep.programs_per_sm]) for family in
               ("bias_dropout_add_layernorm", "bias_gelu_layernorm", "embeddings", "bias_gelu")]
    sweeps += [("bias_gelu", "gelu_tile", [{"gelu_tile": t} for t in sweep.gelu_tiles])]
    for hidden in sweep.hiddens:
        for family, knob, settings in sweeps:
            baseline = _family_times(family, hidden, sweep)
            rows = []
            for knobs in settings:
                print(f"{family} hidden={hidden} {knobs}")
                times = _family_times(family, hidden, sweep, **knobs)
                if times["fwd"] is not None and times["bwd"] is not None:
                    rows.append((times["fwd"] + times["bwd"], knobs[knob], times))
            rows.sort(key=lambda r: r[0])
            for label, value, times in [("shipped", "-", baseline)] + [("fastest", v, t) for _, v, t in rows[:1]]:
                case = times["case"]
                pct = [100 * case.bytes_moved(mode) / (times[mode] * 1e-3) / (H100_TBPS * 1e12)
                       for mode in ("fwd", "bwd")]
                lines.append(f"| {family} | {hidden} | {knob} | {value} | {times['fwd']:.4f} | {times['bwd']:.4f} "
                             f"| {pct[0]:.1f} | {pct[1]:.1f} | {label} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("attention", "layernorm", "all"), default="all")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement")
    parser.add_argument("--out", type=Path, help="write the tables here (markdown)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels.py measures GPU launch configurations: it needs a CUDA device")
    sections = [f"# Launch configurations on {torch.cuda.get_device_name()}", "",
                f"torch {torch.__version__}, triton {triton.__version__}", ""]
    sweep = Sweep(torch.device("cuda"), reps=args.reps)
    if args.family in ("attention", "all"):
        sections += tune_attention(sweep) + [""]
    if args.family in ("layernorm", "all"):
        sections += tune_layernorm(sweep) + [""]
    report = "\n".join(sections)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

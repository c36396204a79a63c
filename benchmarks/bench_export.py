"""The inference family's rows for the exported package: MiniLM-L6, fp32, at 1 x 24, 1 x 128 and the ragged
batch of 8, where `bertfast export`'s .pt2 package runs beside the eager model, ONNX Runtime's optimized
model and the other peers. `python benchmarks/bench_export.py --threads 2 ...` takes the options of
`bertfast bench` (see `bertfast bench --help`); the whole family is `bertfast bench inference`."""

import sys

from bertfast.bench.cli import main
from bertfast.bench.families import inference

if __name__ == "__main__":
    if "--quick" not in sys.argv:
        full_models, full_shapes = inference.models, inference.shapes
        inference.models = lambda ctx: [m for m in full_models(ctx) if not isinstance(m, str) and m.name == "MiniLM-L6"]
        inference.shapes = lambda ctx: full_shapes(ctx)[:3]
        inference.PRECISIONS = ("fp32",)
    sys.exit(main(["inference", *sys.argv[1:]]))

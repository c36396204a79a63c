"""`bertfast bench inference` on its own: `python benchmarks/bench_inference.py [--quick] ...` takes the
options of `bertfast bench` (see `bertfast bench --help`)."""

import sys

from bertfast.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["inference", *sys.argv[1:]]))

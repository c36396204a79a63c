"""`bertfast bench layernorm-family` on its own: `python benchmarks/bench_layernorm_family.py [--quick] ...` takes the
options of `bertfast bench` (see `bertfast bench --help`)."""

import sys

from bertfast.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["layernorm-family", *sys.argv[1:]]))

"""`bertfast bench mlm-head` on its own: `python benchmarks/bench_mlm_head.py [--quick] ...` takes the
options of `bertfast bench` (see `bertfast bench --help`)."""

import sys

from bertfast.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["mlm-head", *sys.argv[1:]]))

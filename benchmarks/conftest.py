"""Options of the pytest-benchmark entry (``pytest benchmarks --benchmark-only``)."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bertfast bench")
    group.addoption("--bench-quick", action="store_true", help="the suite's --quick cases: tiny shapes")
    group.addoption("--bench-no-compile", action="store_true", help="leave out the torch.compile baselines")

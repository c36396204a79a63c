"""The suite's cases under pytest-benchmark, for those who track benchmarks that way:

    pytest benchmarks --benchmark-only                       # every family, at the suite's shapes
    pytest benchmarks --benchmark-only --bench-quick -k attention   # tiny shapes, one family
    pytest benchmarks --benchmark-only --benchmark-autosave  # pytest-benchmark's own history and compare

One test per family, kernel, shape, mode and baseline, the cases of ``bertfast bench`` (same tensors,
models and callables; pytest-benchmark does the timing). It is not part of the normal test command:
``pytest`` alone collects ``tests/`` only.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bertfast.bench import FAMILIES
from bertfast.bench.suite import Context, Entry, Group, family_module
from bertfast.bench.timing import Plan

pytest.importorskip("pytest_benchmark")


@functools.cache
def _context(quick: bool, compile_: bool) -> Context:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Context(device, quick, compile_, Plan(1, 5, 3))


@functools.cache
def _groups(family: str, quick: bool, compile_: bool) -> list[Group]:
    return family_module(family).groups(_context(quick, compile_))


@functools.lru_cache(maxsize=1)  # the tests of one group run one after another; keep only its models
def _built(family: str, index: int, quick: bool, compile_: bool) -> dict[str, Entry | str]:
    return _groups(family, quick, compile_)[index].built()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("bench_quick")
    compile_ = not metafunc.config.getoption("bench_no_compile")
    params = []
    for family in FAMILIES:
        for index, group in enumerate(_groups(family, quick, compile_)):
            for mode in group.modes:
                for baseline in group.baselines:
                    params.append(pytest.param((family, index, mode, baseline, quick, compile_),
                                               id=f"{family}/{group.kernel}/{group.shape}/{mode}/{baseline}"))
    metafunc.parametrize("case", params)


def test_case(benchmark, case) -> None:
    family, index, mode, baseline, quick, compile_ = case
    group = _groups(family, quick, compile_)[index]
    entry = _built(family, index, quick, compile_)[baseline]
    if isinstance(entry, str):
        pytest.skip(entry)
    fn = entry.fns.get(mode)
    if fn is None or isinstance(fn, str):
        pytest.skip(fn or f"{baseline} has no {mode}")
    if group.work.get(mode) and group.unit:
        benchmark.extra_info.update(work=group.work[mode], unit=group.unit)
    if torch.cuda.is_available():
        def call():
            fn()
            torch.cuda.synchronize()
        benchmark(call)
    else:
        benchmark(fn)

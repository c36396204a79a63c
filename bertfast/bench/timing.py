"""The suite's clock: warm-up, interleaved rounds of repetitions, and the statistics of the samples.

On a GPU every call is timed with CUDA events after the L2 cache is flushed (a 256 MB buffer is
zeroed before each call), as ``triton.testing.do_bench`` does, and the repetition count follows
the call's duration (about 25 ms of warm-up and 100 ms of timed calls per baseline). On a CPU each
call is timed with ``perf_counter``. Baselines take turns round after round, so that a machine
shared with other work slows them alike. On a CPU, in the suite's full runs, each baseline's block of
calls starts after a pause (``CPU_SETTLE_S``) in which the threads of the previous one fall asleep:
engines keep theirs spinning after a call (Intel OpenMP for 200 ms by default, as CTranslate2 ships
it), which would otherwise take the cores from whichever baseline comes next.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 cache
CPU_SETTLE_S = 0.25  # longer than the spin-wait of the thread pools of the CPU engines compared


@dataclass(frozen=True)
class Plan:
    """How many calls: ``warmup`` untimed, then ``rounds`` rounds of ``reps`` timed calls per baseline."""

    warmup: int
    reps: int
    rounds: int


@dataclass(frozen=True)
class Stats:
    """Milliseconds per call over every timed sample; ``round_ms`` holds each round's median."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    samples: int
    round_ms: tuple[float, ...]

    @classmethod
    def of(cls, rounds: list[list[float]]) -> Stats:
        samples = sorted(t for block in rounds for t in block)
        if len(samples) == 1:
            q25 = q75 = samples[0]
        else:
            q25, _, q75 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(statistics.median(samples), q25, q75, samples[0], samples[-1], len(samples),
                   tuple(statistics.median(block) for block in rounds))

    @property
    def best_round_ms(self) -> float:
        """The fastest round's median: the least disturbed estimate on a shared machine."""
        return min(self.round_ms)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q75_ms - self.q25_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "round_ms": list(self.round_ms)}

    @classmethod
    def from_dict(cls, data: dict) -> Stats:
        return cls(**{**data, "round_ms": tuple(data["round_ms"])})


class Clock:
    """Times calls on one device."""

    def __init__(self, device: torch.device, settle_s: float = 0.0) -> None:
        """``settle_s``: the pause before each block of calls on a CPU (the suite's full runs: ``CPU_SETTLE_S``)."""
        self.device = device
        self.settle_s = settle_s if device.type == "cpu" else 0.0
        self._flush = (torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
                       if device.type == "cuda" else None)

    def once_ms(self, fn: Callable[[], object]) -> float:
        if self._flush is None:
            start = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - start)
        self._flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def gpu_plan(self, fn: Callable[[], object], rounds: int) -> Plan:
        """do_bench's budget: ~25 ms of warm-up and ~100 ms of timed calls, at least 5 samples."""
        estimate = max(statistics.median(self.once_ms(fn) for _ in range(5)), 1e-3)
        reps = max(5, round(100 / estimate)) // rounds or 1
        return Plan(warmup=max(1, round(25 / estimate)), reps=min(reps, 1000), rounds=rounds)

    def compare(self, fns: dict[str, Callable[[], object]], plan: Plan) -> dict[str, Stats]:
        """Stats of each function, their rounds interleaved. Warm-up happens before any timing."""
        plans = {name: self.gpu_plan(fn, plan.rounds) if self._flush is not None else plan
                 for name, fn in fns.items()}
        for name, fn in fns.items():
            for _ in range(plans[name].warmup):
                fn()
        rounds: dict[str, list[list[float]]] = {name: [] for name in fns}
        for _ in range(plan.rounds):
            for name, fn in fns.items():
                if self.settle_s and len(fns) > 1:
                    time.sleep(self.settle_s)
                rounds[name].append([self.once_ms(fn) for _ in range(plans[name].reps)])
        return {name: Stats.of(blocks) for name, blocks in rounds.items()}


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median time of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones (the tuning sweep's clock)."""
    return Clock(device).compare({"fn": fn}, Plan(warmup, reps, 1))["fn"].median_ms

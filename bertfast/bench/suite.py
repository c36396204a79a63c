"""The suite's building blocks: a family lists groups of cases; the runner times them into measurements.

A *group* is one kernel at one shape: the named baselines that compute the same thing (bertfast,
the eager reference, ``torch.compile``, SDPA backends, transformers, ...) and the modes each is
timed in (forward, backward, both, a training step, ...). Its tensors and models are built only when
the group runs (or when the pytest-benchmark entry needs it), so listing the groups is cheap.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from bertfast.bench import FAMILIES
from bertfast.bench.environment import load_average
from bertfast.bench.timing import CPU_SETTLE_S, Clock, Plan, Stats

# throughput unit -> the factor from (work per call / seconds) to the unit
UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12, "tokens/s": 1.0}


@dataclass(frozen=True)
class Context:
    """What every family needs to know about the run."""

    device: torch.device
    quick: bool
    compile: bool  # whether to time the torch.compile baselines
    plan: Plan  # repetitions on a CPU (a GPU sizes them by time)
    rounds_given: bool = False  # --rounds was given: families with their own round count follow it
    st_models: tuple[str, ...] = ()  # --st-model: the st-train family's models (empty: all of them)
    inference_models: tuple[str, ...] = ()  # --inference-model: the inference family's (empty: all of them)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def interpreted_triton(self) -> bool:
        """The Triton kernels can run here only in the interpreter (CPU tensors, TRITON_INTERPRET=1)."""
        return not self.on_gpu and os.environ.get("TRITON_INTERPRET") == "1" and _has("triton")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass
class Entry:
    """One baseline of a group: a callable per mode (or why it cannot run in that mode), facts about
    it (an error, a loss; ``mode_info`` per mode), and an optional ``probe`` run once after timing for
    what is not time (peak memory)."""

    fns: dict[str, Callable[[], object] | str]
    info: dict = field(default_factory=dict)
    probe: Callable[[], dict] | None = None
    mode_info: dict[str, dict] = field(default_factory=dict)
    work: dict[str, float] | None = None  # per mode, where this baseline does other work than the group's


@dataclass
class Group:
    kernel: str
    shape: str
    size: float  # the plots' x axis
    size_label: str
    baselines: tuple[str, ...]
    build: Callable[[], dict[str, Entry | str]]  # baseline -> its entry, or why it cannot run here
    modes: tuple[str, ...] = ("fwd",)
    work: dict[str, float] = field(default_factory=dict)  # per mode: bytes, FLOPs or tokens per call
    unit: str | None = None  # a key of UNITS
    dtype: str = "fp32"
    subject: str = "bertfast"  # the baseline the speed-ups are relative to
    statistic: str = "median"  # or "best_round": the fastest round's median
    plan: Plan | None = None  # overrides the context's plan
    info: dict = field(default_factory=dict)
    warm: bool = False  # build() already called every callable once (no separate first call needed)

    def built(self) -> dict[str, Entry | str]:
        try:
            entries = self.build()
        except ModuleNotFoundError as e:
            return {name: f"needs {e.name}, which is not installed" for name in self.baselines}
        except Exception as e:  # a baseline's model or tensors cannot be made here: every baseline says why
            return {name: f"failed: {_first_line(e)}" for name in self.baselines}
        return {name: entries.get(name, "not available here") for name in self.baselines}


@dataclass
class Measurement:
    family: str
    kernel: str
    shape: str
    size: float
    size_label: str
    baseline: str
    mode: str
    dtype: str
    status: str  # "ok", or why there is no time
    stats: Stats | None = None
    statistic: str = "median"
    work: float | None = None
    unit: str | None = None
    subject: str = "bertfast"
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, ...]:
        return (self.family, self.kernel, self.shape, self.baseline, self.mode)

    @property
    def ms(self) -> float | None:
        if self.stats is None:
            return None
        return self.stats.best_round_ms if self.statistic == "best_round" else self.stats.median_ms

    @property
    def throughput(self) -> float | None:
        if self.ms is None or not self.work or self.unit is None:
            return None
        return self.work / (self.ms * 1e-3) / UNITS[self.unit]

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in ("family", "kernel", "shape", "size", "size_label", "baseline", "mode",
                                              "dtype", "status", "statistic", "work", "unit", "subject", "info")}
        data["ms"] = self.ms
        data["throughput"] = self.throughput
        data["stats"] = self.stats.to_dict() if self.stats else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        fields = {k: v for k, v in data.items() if k not in ("ms", "throughput", "stats")}
        return cls(**fields, stats=Stats.from_dict(data["stats"]) if data.get("stats") else None)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:150] if lines else ''}"


def family_module(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown benchmark family {name!r}; choose from {', '.join(FAMILIES)}")
    return importlib.import_module(f"bertfast.bench.families.{name.replace('-', '_')}")


def run_group(family: str, group: Group, ctx: Context, clock: Clock, log: Callable[[str], None]) -> list[Measurement]:
    """Time every runnable baseline of ``group`` in each mode, baselines interleaved round by round."""
    entries = group.built()
    plan = group.plan or ctx.plan
    out: list[Measurement] = []

    def measurement(baseline: str, mode: str, status: str, stats: Stats | None = None,
                    info: dict | None = None) -> Measurement:
        entry = entries.get(baseline)
        own = entry.work if isinstance(entry, Entry) and entry.work else {}
        return Measurement(family, group.kernel, group.shape, group.size, group.size_label, baseline, mode,
                           group.dtype, status, stats, group.statistic, own.get(mode, group.work.get(mode)),
                           group.unit, group.subject, {**group.info, **(info or {})})

    logged = 0
    for mode in group.modes:
        runnable: dict[str, Callable[[], object]] = {}
        for name, entry in entries.items():
            if isinstance(entry, str):
                out.append(measurement(name, mode, entry))
            elif mode not in entry.fns:
                continue  # a baseline of some modes only (the inference family's GEMM)
            elif isinstance(entry.fns[mode], str):
                out.append(measurement(name, mode, entry.fns[mode]))
            else:
                try:
                    if not group.warm:
                        entry.fns[mode]()  # the first call outside any timing: compiles, and fails early
                except Exception as e:
                    out.append(measurement(name, mode, f"failed: {_first_line(e)}"))
                    continue
                runnable[name] = entry.fns[mode]
        if runnable:
            stats = clock.compare(runnable, plan)
            for name in runnable:
                entry = entries[name]
                extra = {**entry.info, **entry.mode_info.get(mode, {})}
                if entry.probe is not None and mode == group.modes[-1]:
                    extra.update(entry.probe())
                out.append(measurement(name, mode, "ok", stats[name], extra))
        for m in out[logged:]:
            shown = f"{m.ms:10.3f} ms" if m.ms is not None else m.status
            log(f"  {group.kernel} {group.shape} {m.mode:8s} {m.baseline:32s} {shown}")
        logged = len(out)
    gc.collect()
    return out


def run_family(name: str, ctx: Context, log: Callable[[str], None] = print) -> dict:
    """Every group of one family: its measurements, the load before and after, and its notes."""
    module = family_module(name)
    clock = Clock(ctx.device, settle_s=0.0 if ctx.quick else CPU_SETTLE_S)
    load_before = load_average()
    log(f"== {name}")
    start = time.perf_counter()
    measurements: list[Measurement] = []
    for group in module.groups(ctx):
        measurements += run_group(name, group, ctx, clock, log)
    derive = getattr(module, "derive", None)
    if derive is not None:  # what follows from several measurements (the inference family's limits)
        derive(measurements)
    return {"family": name, "title": module.TITLE, "notes": module.NOTES, "load_average_start": load_before,
            "load_average_end": load_average(), "seconds": time.perf_counter() - start,
            "measurements": measurements}

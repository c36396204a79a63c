"""A run's outputs: the JSON record, a Markdown report and a plot per family, and comparisons of two runs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from bertfast.bench.suite import Measurement

SCHEMA = 1
HIDDEN_INFO = ("series", "interpreted", "lengths", "padded_to", "gemm_flops", "weight_bytes", "limit",
               "plotted")  # in the JSON, not the tables (the inference family tabulates its limits itself)


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ the record


def run_record(environment: dict, peaks: dict, settings: dict, families: list[dict]) -> dict:
    return {
        "schema": SCHEMA, "environment": environment, "peaks": peaks, "settings": settings,
        "families": {f["family"]: {**f, "measurements": [m.to_dict() for m in f["measurements"]]}
                     for f in families},
    }


def load_run(path: Path) -> dict:
    """A saved run, its measurements as :class:`Measurement` objects."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the saved benchmark run {path}: {e}") from e
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or "families" not in record:
        raise ValueError(f"{path} is not a saved run of `bertfast bench` (schema {SCHEMA})")
    for family in record["families"].values():
        family["measurements"] = [Measurement.from_dict(m) for m in family["measurements"]]
    return record


# ------------------------------------------------------------------------------------------------ Markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    return f"{value:.{max(0, digits - 1 - magnitude)}f}" if magnitude < digits else f"{value:,.0f}"


def peak_fraction(m: Measurement, peaks: dict) -> float | None:
    """This measurement's throughput as a fraction of the device's measured peak for its unit and dtype."""
    if m.throughput is None:
        return None
    peak = {"GB/s": peaks.get("bandwidth_gbps"), "TFLOP/s": peaks.get(f"{m.dtype}_tflops")}.get(m.unit or "")
    return m.throughput / peak if peak else None


def _subject_ms(ms: list[Measurement]) -> dict[tuple, float]:
    return {(m.kernel, m.shape, m.mode): m.ms for m in ms if m.baseline == m.subject and m.ms is not None}


def header_lines(title: str, record: dict, family: dict) -> list[str]:
    env = record["environment"]
    threads = f", {env['threads']} threads" if env["device"] == "cpu" else ""
    load = (f"load average {family['load_average_start']:.1f} -> {family['load_average_end']:.1f} "
            f"on {env['cpu_count']} cores" if family.get("load_average_start") is not None else "")
    plan = record["settings"]["plan"]
    lines = [f"# {title}", "",
             f"{env['device_name']}{threads}; {load}; {env['date']}, commit {env['commit'] or 'unknown'}; "
             f"torch {env['versions']['torch']}" + (" (Triton in the interpreter)" if env["triton_interpret"] else "")
             + "".join(f"; {k}={v}" for k, v in env.get("environment_variables", {}).items()
                       if k not in ("TRITON_INTERPRET",)),
             ""]
    if env["device"] == "cuda":
        lines += ["Times: CUDA events with an L2 flush before each call, ~25 ms of warm-up and ~100 ms of calls "
                  f"per baseline in {plan['rounds']} interleaved rounds; median and interquartile range.", ""]
    else:
        lines += [f"Times: a first untimed call and {plan['warmup']} more warm-up call(s), then {plan['rounds']} "
                  f"interleaved rounds of {plan['reps']} call(s) per baseline; median and interquartile range of the "
                  "calls (unless the section says otherwise).", ""]
    if record["settings"]["quick"]:
        lines += ["**Quick mode**: tiny shapes and one or two repetitions. These numbers check that the suite "
                  "runs; they say nothing about speed.", ""]
    return lines


def family_markdown(record: dict, family: dict, extra: list[str] | None = None) -> str:
    ms: list[Measurement] = family["measurements"]
    peaks = record["peaks"]
    lines = header_lines(family["title"], record, family) + [family["notes"].strip(), ""]
    lines += extra or []
    subject = _subject_ms(ms)
    by_kernel: dict[str, list[Measurement]] = defaultdict(list)
    for m in ms:
        by_kernel[m.kernel].append(m)
    for kernel, rows in by_kernel.items():
        unit = next((m.unit for m in rows if m.unit), None)
        subject_name = rows[0].subject
        statistic = "best round" if rows[0].statistic == "best_round" else "median"
        head = ["shape", "mode", "baseline", f"ms ({statistic})", "IQR"]
        head += [unit] if unit else []
        head += ["% peak"] if peaks and unit in ("GB/s", "TFLOP/s") else []
        head += [f"{subject_name} speed-up over it", "notes"]
        lines += [f"## {kernel}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in rows:
            base = subject.get((m.kernel, m.shape, m.mode))
            cells = [m.shape, m.mode, m.baseline, _fmt(m.ms),
                     f"{100 * m.stats.spread:.0f}%" if m.stats else "-"]
            cells += [_fmt(m.throughput)] if unit else []
            if peaks and unit in ("GB/s", "TFLOP/s"):
                fraction = peak_fraction(m, peaks)
                cells.append(f"{100 * fraction:.1f}%" if fraction is not None else "-")
            cells.append(f"{m.ms / base:.2f}x" if base and m.ms else "-")
            notes = [] if m.status == "ok" else [m.status]
            notes += [f"{k} {_info_value(k, v)}" for k, v in m.info.items() if k not in HIDDEN_INFO]
            if m.stats and m.statistic == "best_round":
                rounds = len(m.stats.round_ms)
                notes.append(f"{rounds} rounds x {m.stats.samples // rounds} calls")
            cells.append("; ".join(notes).replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _info_value(key: str, value: object) -> str:
    if key == "cos_min" and isinstance(value, float):
        return f"{value:.5f}"
    return _fmt(value) if isinstance(value, float) else str(value)


def write_reports(record: dict, out_dir: Path) -> None:
    """``<family>.md`` and ``<family>.png`` for every family of a run, with the families' current notes."""
    from bertfast.bench.suite import family_module

    for name, family in record["families"].items():
        module = family_module(name)
        family = {**family, "title": module.TITLE, "notes": module.NOTES}
        summary = getattr(module, "summary", None)
        extra = summary(record, family) if summary else None
        write_atomic(out_dir / f"{name}.md", family_markdown(record, family, extra))
        family_plot(family, out_dir / f"{name}.png")


# ------------------------------------------------------------------------------------------------ plots


def family_plot(family: dict, path: Path) -> None:
    """Throughput (or time) against size, one panel per kernel, mode and series, one line per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[Measurement]] = defaultdict(list)
    for m in family["measurements"]:
        # Interpreter times would flatten the rest; a measurement of another unit (a copy's bandwidth) says so.
        if m.ms is not None and not m.info.get("interpreted") and m.info.get("plotted", True):
            panels[(m.kernel, m.mode, m.info.get("series", ""))].append(m)
    columns = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no successful measurement", ha="center", va="center")
    for ax, ((kernel, mode, series), ms) in zip(axes.flat, panels.items(), strict=False):
        unit = ms[0].unit
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for m in ms:
            lines[m.baseline].append((m.size, m.throughput if unit and m.throughput is not None else m.ms))
        for baseline, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=baseline,
                    linewidth=2.5 if baseline == ms[0].subject else 1.2)
        sizes = {m.size for m in ms}
        if len(sizes) > 1 and max(sizes) / max(min(sizes), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_title(" ".join(filter(None, (kernel, mode, series))), fontsize=10)
        ax.set_xlabel(ms[0].size_label)
        ax.set_ylabel(unit or "ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(family["title"], fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ comparison


def compare(current: dict, saved: dict, threshold: float) -> tuple[list[str], int]:
    """Markdown lines of per-kernel ratios (current / saved time) and the number of regressions.

    A slowdown is a regression only when it lies beyond the run-to-run spread: the current run's
    lower quartile is above the saved run's upper quartile, and the ratio exceeds ``1 + threshold``.
    Improvements are flagged the same way in the other direction.
    """
    old = {m.key: m for f in saved["families"].values() for m in f["measurements"] if m.stats}
    lines = ["| family | kernel | shape | mode | baseline | saved ms | now ms | now / saved | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    regressions = 0
    for family in current["families"].values():
        for m in family["measurements"]:
            before = old.get(m.key)
            if m.stats is None or before is None or before.ms is None:
                continue
            ratio = m.ms / before.ms
            verdict = "same"
            if m.stats.q25_ms > before.stats.q75_ms and ratio > 1 + threshold:
                verdict, regressions = "**REGRESSION**", regressions + 1
            elif m.stats.q75_ms < before.stats.q25_ms and ratio < 1 / (1 + threshold):
                verdict = "faster"
            lines.append(f"| {m.family} | {m.kernel} | {m.shape} | {m.mode} | {m.baseline} | {_fmt(before.ms)} | "
                         f"{_fmt(m.ms)} | {ratio:.2f}x | {verdict} |")
    return lines, regressions

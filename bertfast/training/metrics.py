"""``metrics.jsonl`` (one JSON record per line) and the PNG plot of its loss and accuracy curves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bertfast.io import atomic_write, write_error


class MetricsLog:
    """Appends records to ``metrics.jsonl``; on resume, drops records past the checkpoint's step first."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.path, e) from e


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
    return records


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss (left) and MLM/NSP accuracy (right) against the step, train and eval; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)

    def curve(ax, rows, key, label, **style):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, **style)

    # One colour per quantity: train is a line, eval the same colour with markers.
    eval_style = {"marker": "o", "linestyle": "--"}
    curve(loss_ax, train, "loss", "train loss (MLM + NSP)", color="C0")
    curve(loss_ax, evals, "loss", "eval loss", color="C0", **eval_style)
    curve(loss_ax, train, "mlm_loss", "train MLM loss", color="C1")
    curve(loss_ax, evals, "mlm_loss", "eval MLM loss", color="C1", **eval_style)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    curve(acc_ax, train, "mlm_acc", "train MLM acc", color="C1")
    curve(acc_ax, evals, "mlm_acc", "eval MLM acc", color="C1", **eval_style)
    curve(acc_ax, train, "nsp_acc", "train NSP acc", color="C2")
    curve(acc_ax, evals, "nsp_acc", "eval NSP acc", color="C2", **eval_style)
    if evals and evals[-1].get("baseline_mlm_acc") is not None:
        acc_ax.axhline(evals[-1]["baseline_mlm_acc"], color="gray", linestyle="--",
                       label="most-frequent-token MLM acc")
    acc_ax.axhline(0.5, color="gray", linestyle=":", label="NSP chance")
    acc_ax.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))

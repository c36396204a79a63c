"""``bertfast glue``: fine-tune and score every GLUE task of a download, and average them into the GLUE score.

The data directory is laid out as GLUE's download script writes it: one folder per task (CoLA,
SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI) holding ``train.tsv`` and ``dev.tsv`` (MNLI:
``dev_matched.tsv`` and ``dev_mismatched.tsv``), each with the task's own columns; CoLA's files have no
header. Each task is fine-tuned from the same model into ``OUTPUT_DIR/TASK`` (a ``bertfast finetune``
run directory) and scored on its dev set with its official metrics. A task's score is the mean of its
metrics (MNLI: of matched and mismatched accuracy); the GLUE score is the mean of the task scores.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bertfast.finetune.config import FinetuneConfig
from bertfast.finetune.data import DataError
from bertfast.finetune.results import TRANSFORMERS_NAMES, write_eval_results
from bertfast.finetune.trainer import Finetuner
from bertfast.io import CheckpointError, atomic_write_text
from bertfast.training.rundir import RunDirectory

GLUE_RESULTS = "glue_results"
# Defaults of every task (the BERT paper's recipe); GlueTask.defaults and the command line override them.
DEFAULTS: dict[str, Any] = {"epochs": 3, "batch_size": 32, "lr": 2e-5, "seq_len": 128, "warmup_ratio": 0.1}


@dataclass(frozen=True)
class GlueTask:
    name: str
    text: str
    text_pair: str | None
    label: str
    labels: tuple[str, ...] | None  # in the order of transformers' GLUE processors; None: regression
    metrics: tuple[str, ...]  # official metrics, as bertfast's eval records name them; the first picks the best epoch
    eval_files: tuple[str, ...] = ("dev.tsv",)
    column_names: tuple[str, ...] | None = None  # a headerless task's columns
    defaults: dict[str, Any] = field(default_factory=dict)


SMALL = {"epochs": 5}  # the small datasets get more passes
TASKS = (
    GlueTask("CoLA", "sentence", None, "label", ("0", "1"), ("matthews",),
             column_names=("source", "label", "original_label", "sentence"), defaults=SMALL),
    GlueTask("SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",)),
    GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("f1", "accuracy"), defaults=SMALL),
    GlueTask("STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman"), defaults=SMALL),
    GlueTask("QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("f1", "accuracy")),
    GlueTask("MNLI", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
             ("accuracy",), eval_files=("dev_matched.tsv", "dev_mismatched.tsv")),
    GlueTask("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",),
             defaults=SMALL),
    GlueTask("WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("accuracy",), defaults=SMALL),
)
MISMATCHED = "_mm"  # suffix of MNLI's mismatched metrics, as run_glue.py writes them
# What makes a directory hold a GLUE run: the results and the task folders (each a fine-tuning run directory).
GLUE_FILES = (f"{GLUE_RESULTS}.json", f"{GLUE_RESULTS}.md", f"{GLUE_RESULTS}.png", *(t.name for t in TASKS))


def _key(name: str) -> str:
    return name.lower().replace("-", "")


def find_task(name: str) -> GlueTask:
    """A GLUE task by name, in any case, with or without its dash (``sst2``, ``STS-B``)."""
    for task in TASKS:
        if _key(task.name) == _key(name):
            return task
    raise ValueError(f"unknown GLUE task {name!r}; the tasks are {', '.join(t.name for t in TASKS)}")


def task_config(task: GlueTask, data_dir: Path, model: str, output_dir: Path,
                options: dict[str, Any]) -> FinetuneConfig:
    """The ``bertfast finetune`` run of one task: its files, columns and labels, defaults < ``options``."""
    folder = data_dir / task.name
    if not folder.is_dir():
        raise DataError(f"{task.name}: no folder {folder}")
    for name in ("train.tsv", *task.eval_files):
        if not (folder / name).is_file():
            raise DataError(f"{task.name}: {folder} has no {name}")
    fixed = {
        "task": "classification", "model": model, "train": str(folder / "train.tsv"),
        "eval": str(folder / task.eval_files[0]), "output_dir": str(output_dir / task.name),
        "data_format": "tsv", "text_column": task.text, "text_pair_column": task.text_pair,
        "label_column": task.label, "column_names": list(task.column_names) if task.column_names else None,
        "label_names": list(task.labels) if task.labels else None, "regression": task.labels is None,
        "progress": False,  # one bar for all tasks
    }
    clash = sorted({str(k).replace("-", "_") for k in options} & {*fixed, "eval_only", "resume"})
    if clash:
        raise ValueError(f"{task.name}: bertfast glue sets {', '.join(clash)} itself")
    return FinetuneConfig.from_dict({**DEFAULTS, "best_metric": task.metrics[0], **task.defaults, **options,
                                     **fixed})


def _official(task: GlueTask, record: dict[str, Any], suffix: str = "") -> dict[str, float]:
    return {TRANSFORMERS_NAMES.get(m, m) + suffix: record[m] for m in task.metrics}


def run_task(task: GlueTask, config: FinetuneConfig, bar: Any) -> dict[str, Any]:
    """Fine-tune one task and score it; ``bar`` advances one step per epoch."""
    def advance(epoch: int, record: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{task.name} epoch {epoch}")

    tuner = Finetuner(config, on_epoch=advance)
    best = tuner.run()
    metrics = _official(task, best)
    eval_examples = {task.eval_files[0]: len(tuner.eval_examples)}
    run_dir, folder = Path(config.output_dir), Path(config.train).parent
    for extra in task.eval_files[1:]:  # MNLI mismatched: the best model, evaluated as it is
        evaluation = FinetuneConfig.from_dict({
            **config.to_dict(), "model": str(run_dir / "best"), "eval": str(folder / extra),
            "output_dir": str(run_dir / Path(extra).stem), "eval_only": True, "train": None})
        checker = Finetuner(evaluation)
        record = checker.run()
        metrics.update(_official(task, record, MISMATCHED))
        eval_examples[extra] = len(checker.eval_examples)
        write_eval_results(run_dir, record, len(checker.eval_examples), MISMATCHED)
    return {**metrics, "score": sum(metrics.values()) / len(metrics), "best_epoch": best["epoch"],
            "train_examples": len(tuner.train_examples), "eval_examples": eval_examples,
            "output_dir": config.output_dir}


def run_glue(data_dir: str | os.PathLike, model: str, output_dir: str | os.PathLike, tasks: list[str] | None = None,
             options: dict[str, Any] | None = None, task_options: dict[str, dict[str, Any]] | None = None,
             progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune and score each task; write ``glue_results.json``, ``.md`` and ``.png`` in ``output_dir``.

    ``output_dir`` is guarded as a training run's (:class:`~bertfast.training.rundir.RunDirectory`): locked
    while the tasks run, and refused when it holds a GLUE run unless ``overwrite`` deletes that run first.

    Without ``tasks``, every task whose folder is in ``data_dir`` runs; a named task without one is an
    error. A task that fails (a missing file, a bad row) is reported under ``errors`` and the others
    still run. ``options`` override the defaults of every task, ``task_options[name]`` those of one.
    """
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would train and write the same tasks
        raise ValueError("bertfast glue runs in one process; under torchrun use bertfast finetune per task")
    if not data_dir.is_dir():
        raise DataError(f"GLUE data directory {data_dir} does not exist")
    chosen = [find_task(name) for name in tasks] if tasks else [t for t in TASKS if (data_dir / t.name).is_dir()]
    if not chosen:
        raise DataError(f"{data_dir} holds none of the GLUE task folders ({', '.join(t.name for t in TASKS)})")
    unknown = sorted(set(task_options or {}) - {t.name for t in TASKS})
    if unknown:
        raise ValueError(f"--set names unknown GLUE task(s) {', '.join(unknown)}")
    results: dict[str, Any] = {"tasks": {}, "errors": {},
                               "absent": [t.name for t in TASKS if not (data_dir / t.name).is_dir()]}
    configs: dict[str, FinetuneConfig] = {}
    for task in chosen:
        try:
            configs[task.name] = task_config(task, data_dir, model, output_dir,
                                             {**(options or {}), **(task_options or {}).get(task.name, {})})
        except DataError as e:  # bad options (a ValueError) stop everything instead
            results["errors"][task.name] = str(e)
    run_dir = RunDirectory.open(output_dir, GLUE_FILES, resume=False, overwrite=overwrite, say=tqdm.write,
                                resumable=False)
    try:
        _run_tasks(chosen, configs, results, progress)
        scores = [r["score"] for r in results["tasks"].values()]
        results["average"] = sum(scores) / len(scores) if scores else None
        write_results(output_dir, results)
    finally:
        run_dir.release()
    return results


def _run_tasks(chosen: list[GlueTask], configs: dict[str, FinetuneConfig], results: dict[str, Any],
               progress: bool) -> None:
    """Each task in turn, into ``results`` (a failed one under ``errors``), with one bar over all epochs."""
    bar = tqdm(total=sum(c.epochs for c in configs.values()), desc="GLUE", unit="epoch", disable=not progress)
    for task in chosen:
        if task.name not in configs:
            tqdm.write(f"GLUE {task.name}: error: {results['errors'][task.name]}")
            continue
        tqdm.write(f"GLUE {task.name}")
        start = bar.n
        try:
            results["tasks"][task.name] = run_task(task, configs[task.name], bar)
        except (DataError, CheckpointError, FileNotFoundError) as e:
            results["errors"][task.name] = str(e)
            tqdm.write(f"GLUE {task.name}: error: {e}")
            bar.update(start + configs[task.name].epochs - bar.n)  # the epochs it will not run
    bar.close()


def _percent(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.1f}"


_SHOWN = {"matthews_correlation": "Matthews", "pearson": "Pearson", "spearmanr": "Spearman", "f1": "F1",
          "accuracy": "acc", "accuracy" + MISMATCHED: "acc (mismatched)"}


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| Task | Metrics | Score |", "|---|---|---:|"]
    for name, r in results["tasks"].items():
        shown = " / ".join(f"{label} {_percent(r[key])}" for key, label in _SHOWN.items() if key in r)
        lines.append(f"| {name} | {shown} | {_percent(r['score'])} |")
    for name, error in results["errors"].items():
        lines.append(f"| {name} | error: {error.replace('|', '/')} | |")
    average = results["average"]
    lines.append(f"| **GLUE score** ({len(results['tasks'])} tasks) | | **{_percent(average)}** |")
    return "\n".join(lines) + "\n\nScores are percentages on each task's dev set.\n"


def write_results(output_dir: Path, results: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / f"{GLUE_RESULTS}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(output_dir / f"{GLUE_RESULTS}.md", markdown_table(results))
    if results["tasks"]:
        plot(results, output_dir / f"{GLUE_RESULTS}.png")


def plot(results: dict[str, Any], path: Path) -> None:
    """A bar per task score, and the GLUE score as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["tasks"])
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(names), 3.5))
    ax.bar(names, [100 * results["tasks"][n]["score"] for n in names], color="tab:blue")
    ax.axhline(100 * results["average"], color="tab:red", linestyle="--",
               label=f"GLUE score {100 * results['average']:.1f}")
    ax.set_ylabel("dev score (%)")
    ax.set_ylim(min(0, *(100 * results["tasks"][n]["score"] for n in names)), 100)
    ax.legend(loc="lower right")
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

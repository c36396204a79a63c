"""``eval_results.json``: an evaluation record under the names transformers' example scripts write.

``run_glue.py``, ``run_ner.py`` and ``run_qa.py`` write ``eval_accuracy``, ``eval_f1``,
``eval_matthews_correlation``, ``eval_pearson``, ``eval_spearmanr``, ``eval_exact_match``,
``eval_HasAns_f1``, ``eval_best_f1_thresh``, ``eval_loss``, ``eval_samples``, ``epoch``...; bertfast's
values are fractions, as in ``metrics.jsonl`` (the QA scripts print percentages).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bertfast.io import atomic_write_text

EVAL_RESULTS = "eval_results.json"
# bertfast's metric name -> transformers' where they differ.
TRANSFORMERS_NAMES = {"matthews": "matthews_correlation", "spearman": "spearmanr"}
_BOOKKEEPING = ("split", "epoch", "step")


def transformers_metrics(record: dict[str, Any], samples: int, suffix: str = "") -> dict[str, Any]:
    """``eval_NAME{suffix}`` for each metric of an evaluation record, with ``eval_samples`` and ``epoch``."""
    out: dict[str, Any] = {"epoch": record.get("epoch", 0)}
    for name, value in record.items():
        if name not in _BOOKKEEPING:
            out[f"eval_{TRANSFORMERS_NAMES.get(name, name)}{suffix}"] = value
    out[f"eval_samples{suffix}"] = samples
    return out


def write_eval_results(directory: str | os.PathLike, record: dict[str, Any], samples: int, suffix: str = "") -> None:
    """Write ``eval_results.json``; with a ``suffix`` add the record's metrics to the file that is there
    (MNLI's mismatched ``eval_accuracy_mm`` beside the matched ``eval_accuracy``, as run_glue.py does)."""
    path = Path(directory) / EVAL_RESULTS
    values = transformers_metrics(record, samples, suffix)
    if suffix:  # the file's epoch stays: the one that trained the model
        values = {**json.loads(path.read_text(encoding="utf-8")),
                  **{k: v for k, v in values.items() if k != "epoch"}}
    atomic_write_text(path, json.dumps(values, indent=2) + "\n")

"""``bertfast predict``: a fine-tuned model's predictions for a data file, one JSON line per example.

The task comes from the model's config (``architectures``), the labels from its ``id2label`` and, for
QA trained with unanswerable questions, the no-answer threshold from ``null_score_diff_threshold``.
The input is any format the task reads (labels, if present, are ignored). Each line holds ``where``
(the example's file and line) and:

* classification: ``label`` and ``probabilities`` (label -> probability); regression ``score``;
* token classification: ``tokens`` and their ``tags``;
* multiple choice: ``choice`` and ``probabilities``;
* question answering: ``id`` (when the data has one), ``answer`` and its ``score`` (the span's
  probability in its window), ``""`` and no score when the model finds no answer (v2.0), and
  ``null_score_diff``. An output file ending in ``.json`` is instead the ``{id: answer}`` mapping that
  SQuAD's evaluation scripts read.

The output is guarded as the other commands guard their output directories: the directory it goes to
is locked (``.bertfast.lock``) while the predictions are computed and written, so a run in progress
there (a training run, another prediction) refuses this one and the reverse, and an existing output
file is replaced only with ``overwrite``. The file is written atomically: a failed or interrupted
prediction leaves the old file, or none.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from bertfast.config import BertConfig
from bertfast.data import load_tokenizer
from bertfast.finetune.data import DataError, DataOptions, RowErrors
from bertfast.finetune.tasks import collate, load_fine_tuned, task_of
from bertfast.io import atomic_write_text
from bertfast.training.distributed import DistEnv, pick_device
from bertfast.training.rundir import RunDirectory, RunDirectoryError


def predict(model: str | os.PathLike, input_path: str | os.PathLike, output_path: str | os.PathLike,
            task: str | None = None, options: DataOptions | None = None, seq_len: int = 128, batch_size: int = 32,
            max_answer_length: int = 30, device: str = "auto", skip_bad_rows: bool = False,
            progress: bool = True, overwrite: bool = False) -> list[dict[str, Any]]:
    """Write (and return) the predictions of the fine-tuned ``model`` for each example of ``input_path``.

    Raises :class:`~bertfast.training.rundir.RunDirectoryError` when ``output_path`` exists (without
    ``overwrite``) or its directory is locked by another run.
    """
    output_path = Path(output_path)
    lock = RunDirectory.open(output_path.parent, [], resume=False, overwrite=False, say=tqdm.write, clean=False,
                             flag="--output")
    try:
        if output_path.exists() and not overwrite:
            raise RunDirectoryError(f"--output {output_path} exists; pass --overwrite to replace it, or choose "
                                    "another --output")
        return _predict(model, input_path, output_path, task, options, seq_len, batch_size, max_answer_length,
                        device, skip_bad_rows, progress)
    finally:
        lock.release()


def _predict(model: str | os.PathLike, input_path: str | os.PathLike, output_path: Path, task: str | None,
             options: DataOptions | None, seq_len: int, batch_size: int, max_answer_length: int, device: str,
             skip_bad_rows: bool, progress: bool) -> list[dict[str, Any]]:
    options = replace(options or DataOptions(), labelled=False)
    errors = RowErrors(skip_bad_rows)
    config = BertConfig.from_pretrained(model)
    task_name = task or task_of(config, str(model))
    network, runner = load_fine_tuned(model, task_name, max_answer_length=max_answer_length, options=options,
                                      errors=errors)
    tokenizer = load_tokenizer(model)
    examples = runner.read(input_path)
    # Inputs longer than the model's positions are truncated (QA contexts windowed) to fit them.
    features = runner.encode(examples, tokenizer, min(seq_len, config.max_position_embeddings))
    target = pick_device(device, DistEnv())
    network.to(target).eval()
    loader = DataLoader(features, batch_size=batch_size, collate_fn=partial(collate, pad_id=tokenizer.pad_id))
    outputs: list[Any] = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
            batch = {k: v.to(target) for k, v in batch.items()}
            outputs.extend(runner.split_outputs(network(**batch), batch))
    records = [{"where": e.where, **r}
               for e, r in zip(examples, runner.describe(examples, features, outputs), strict=True)]
    if task_name == "question-answering" and output_path.suffix == ".json":
        if any("id" not in r for r in records):
            raise DataError(f"{input_path}: a .json output maps question ids to answers, but some questions have "
                            "no id; write .jsonl instead")
        atomic_write_text(output_path, json.dumps({r["id"]: r["answer"] for r in records}, indent=1) + "\n")
    else:
        atomic_write_text(output_path, "".join(json.dumps(r) + "\n" for r in records))
    report = errors.report()
    if report:
        tqdm.write(report)
    return records

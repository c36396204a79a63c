"""The options of ``bertfast finetune``: the CLI, the ``--config`` file schema and the defaults in one dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from bertfast.finetune.data import DataOptions
from bertfast.finetune.formats import FORMATS
from bertfast.training.config import coerce_option, option

TASKS = ("classification", "token-classification", "multiple-choice", "question-answering")
REQUIRED = ("task", "model", "eval")  # and train, unless --eval-only


@dataclass
class FinetuneConfig:
    task: str | None = option(None, "what to fine-tune for (required)", choices=TASKS)
    model: str | None = option(
        None, "pretrained directory: config.json + model weights + tokenizer.json or vocab.txt, e.g. "
        "runs/pretrain/final or a transformers BERT directory (required)", metavar="DIR")
    train: str | None = option(None, "training data (required unless --eval-only; formats below)",
                               metavar="FILE")
    eval: str | None = option(None, "evaluation data, in a format of the same task (required)", metavar="FILE")
    data_format: str = option("auto", "format of the data files (auto: from the file's name and content)",
                              choices=FORMATS)
    text_column: str | None = option(None, "column (field) of the text; default: inferred from the column "
                                     "names (token classification: the tokens field)", metavar="NAME")
    text_pair_column: str | None = option(None, "column of the second text of a pair (with --text-column)",
                                          metavar="NAME")
    label_column: str | None = option(None, "column of the label; default: inferred from the column names "
                                      "(token classification: the tags field)", metavar="NAME")
    column_names: list[str] | None = option(None, "the columns of CSV/TSV files without a header line, in order",
                                            metavar="NAME", many=True)
    label_names: list[str] | None = option(None, "the label (tag) set in id order, instead of the labels found "
                                           "in --train; integer labels in JSON data index into it", metavar="NAME",
                                           many=True)
    skip_bad_rows: bool = option(False, "skip the data rows that break their format (counted and reported at "
                                 "the end) instead of stopping at the first")
    regression: bool = option(False, "classification with one float label per example (STS-B style)")
    output_dir: str = option("runs/finetune", "run directory: metrics.jsonl, best/ and last/ models",
                             metavar="DIR")
    epochs: int = option(3, "passes over the training data")
    batch_size: int = option(32, "examples per forward/backward pass (and per evaluation batch)")
    grad_accum: int = option(1, "batches whose gradients add up to one optimizer step (effective batch: "
                             "batch-size x grad-accum)")
    lr: float = option(5e-5, "peak learning rate (AdamW)")
    warmup_ratio: float = option(0.1, "fraction of the steps spent warming the lr up linearly; then linear "
                                 "decay to 0")
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and LayerNorm)")
    clip_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    seq_len: int = option(128, "maximum sequence length in tokens (longer inputs are truncated; QA "
                          "contexts are split into overlapping windows)")
    best_metric: str | None = option(None, "the eval metric that picks the best epoch (default: the task's, "
                                     "see below)", metavar="NAME")
    max_answer_length: int = option(30, "question answering: longest predicted answer, in tokens")
    precision: str = option("auto", "compute precision (auto: bf16 on a GPU that has it, else fp32; "
                            "fp16 uses a gradient scaler)", choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = option(0, "seed of the head's init, the data order and dropout")
    device: str = option("auto", "where to train (auto: cuda if available)", choices=("auto", "cpu", "cuda"))
    max_nonfinite_steps: int = option(5, "stop (exit code 1) after this many consecutive steps skipped for a "
                                      "non-finite loss or gradient norm")
    dist_timeout: float = option(600.0, "seconds a process waits for the others in a collective operation "
                                 "before it stops and names the ones it waited for (several processes only)")
    log_every: int = option(50, "write a train record to metrics.jsonl every N steps (and at each epoch's end)")
    progress: bool = option(True, "show progress bars")
    eval_only: bool = option(False, "evaluate --model, an already fine-tuned model, on --eval: write its "
                             "metrics and predictions, no training")
    overwrite: bool = option(False, "replace the run in OUTPUT_DIR (its models, metrics and predictions are "
                             "deleted first); without it, or --resume, a directory holding a run is refused")
    resume: bool = option(False, "continue the run in OUTPUT_DIR after its last finished epoch (options not "
                          "given are the run's; --epochs may grow)")

    def __post_init__(self) -> None:
        required = REQUIRED if self.eval_only else (*REQUIRED, "train")
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError("missing required option(s): " + ", ".join("--" + m for m in missing))
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "max_answer_length", "max_nonfinite_steps",
                     "dist_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {self.seq_len}")
        if self.regression and self.task != "classification":
            raise ValueError("--regression applies to --task classification only")
        for name in ("column_names", "label_names"):
            values = getattr(self, name)
            if values is not None and (not values or len(set(values)) != len(values)):
                raise ValueError(f"{name} must list distinct names, got {values}")
        if self.resume and self.eval_only:
            raise ValueError("--resume continues training; --eval-only does none")
        if self.resume and self.overwrite:
            raise ValueError("--overwrite replaces the run in OUTPUT_DIR; --resume continues it: pass one")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def data_options(self, labelled: bool = True) -> DataOptions:
        return DataOptions(self.data_format, self.text_column, self.text_pair_column, self.label_column,
                           self.column_names, self.label_names, labelled)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Build from a mapping whose keys may use ``-`` or ``_``; unknown keys raise ValueError."""
        types = {f.name: str(f.type) for f in fields(cls)}
        normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalized) - set(types))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; see `bertfast finetune --help`")
        return cls(**{k: coerce_option(k, types[k], v) for k, v in normalized.items()})

"""The options of a pretraining run: one dataclass that is the CLI, the config-file schema and the defaults.

Each field's metadata holds its help text (and, for some, a short flag name); ``bertfast pretrain``
builds its argument parser from these fields, and ``--config`` files (YAML or JSON) may set any of
them, with ``-`` or ``_`` in names. Precedence: defaults < config file < command line.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bertfast.config import PRESETS
from bertfast.io import read_json_file


def option(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class PretrainConfig:
    # Model and data
    preset: str = option("tiny", "model size", choices=tuple(PRESETS))
    corpus: list[str] = option(
        ["builtin"],
        "corpus files, directories or glob patterns (repeatable); .jsonl/.json files hold one "
        "{\"text\": ...} document per line, other files one sentence per line with a blank line "
        "between documents; 'builtin' is CPython's reference manual (no download)",
    )
    tokenizer: str | None = option(
        None, "tokenizer.json, vocab.txt or a directory holding one; default: train a WordPiece "
        "vocabulary on the corpus (cached in OUTPUT_DIR/tokenizer)",
    )
    vocab_size: int = option(4000, "vocabulary size when training the tokenizer")
    lowercase: bool = option(True, "lowercase text (trained tokenizer, or a bare vocab.txt)")
    seq_len: int = option(128, "maximum sequence length in tokens ([CLS] A [SEP] B [SEP])")
    short_seq_prob: float = option(0.1, "probability of a shorter random target length (as BERT)")
    eval_fraction: float = option(0.05, "fraction of documents held out for evaluation")
    mask_prob: float = option(0.15, "fraction of tokens chosen for MLM")
    mask_token_prob: float = option(0.8, "of the chosen tokens, the fraction replaced by [MASK]")
    random_token_prob: float = option(0.1, "of the chosen tokens, the fraction replaced by a random token")
    whole_word_mask: bool = option(False, "mask whole words (a token and its ## pieces) together")
    num_workers: int = option(0, "DataLoader worker processes building batches (0: in the training process)")
    cache_dir: str | None = option(None, "where tokenised shards are cached (default: OUTPUT_DIR/cache)",
                                 metavar="DIR")
    # Optimisation
    max_steps: int = option(800, "optimizer steps to train for")
    batch_size: int = option(32, "sequences per micro-batch per process (a step sees "
                           "batch-size x grad-accum x processes)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(1e-3, "peak learning rate")
    warmup_steps: int = option(80, "steps of linear warmup to the peak lr, then linear decay to 0 at max-steps")
    weight_decay: float = option(0.01, "decoupled weight decay (not on biases and LayerNorm)")
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "lamb"))
    clip_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    precision: str = option("auto", "compute precision (auto: bf16 on a GPU that has it, else fp32; "
                          "fp16 uses a gradient scaler)", choices=("auto", "fp32", "bf16", "fp16"))
    activation_checkpointing: bool = option(False, "recompute encoder layers in backward to save memory")
    max_nonfinite_steps: int = option(5, "stop after this many consecutive steps skipped for a "
                                    "non-finite loss or gradient norm")
    dist_timeout: float = option(600.0, "seconds a process waits for the others in a collective operation "
                                 "before it stops and names the ones it waited for (several processes only)")
    seed: int = option(0, "seed of the model init, data order, masks and dropout")
    device: str = option("auto", "where to train (auto: cuda if available)", choices=("auto", "cpu", "cuda"))
    # Output
    output_dir: str = option("runs/pretrain", "run directory: metrics, plots, checkpoints, final model",
                           metavar="DIR")
    resume: str | None = option(None, "continue from a checkpoint directory, or 'latest' in OUTPUT_DIR "
                              "(starts fresh when there is none)", metavar="PATH|latest")
    overwrite: bool = option(False, "replace the run in OUTPUT_DIR (its checkpoints, final model and metrics are "
                             "deleted first); without it, or --resume, a directory holding a run is refused")
    save_every: int = option(500, "save a checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(3, "how many checkpoint-STEP directories to keep (0: all)")
    eval_every: int = option(100, "evaluate on the held-out documents every N steps (0: only at the end)")
    log_every: int = option(10, "write a train record to metrics.jsonl every N steps")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        positive = ("vocab_size", "max_steps", "batch_size", "grad_accum", "log_every", "max_nonfinite_steps",
                    "dist_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "weight_decay", "clip_norm", "num_workers", "save_every",
                        "eval_every", "keep_checkpoints", "short_seq_prob", "lr")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_size <= 5:
            raise ValueError(f"vocab_size must exceed BERT's 5 special tokens, got {self.vocab_size}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be at least 8, got {self.seq_len}")
        for name in ("mask_prob", "mask_token_prob", "random_token_prob", "short_seq_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_prob == 0.0:
            raise ValueError("mask_prob must be above 0: with no masked token there is no MLM loss")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(f"mask_token_prob + random_token_prob must be at most 1, got "
                             f"{self.mask_token_prob} + {self.random_token_prob}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.corpus:
            raise ValueError("corpus must name at least one source")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite replaces the run in OUTPUT_DIR; --resume continues it: pass one")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """Build from a mapping whose keys may use ``-`` or ``_``; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        normalized = {str(k).replace("-", "_"): v for k, v in values.items()}
        types = {f.name: str(f.type) for f in fields(cls)}
        unknown = sorted(set(normalized) - known)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; see `bertfast pretrain --help`")
        return cls(**{k: coerce_option(k, types[k], v) for k, v in normalized.items()})


def coerce_option(name: str, kind: str, value: Any) -> Any:
    """Check and convert a config-file value (YAML reads 1e-3 as a string, for one)."""
    try:
        if value is None and kind.endswith("| None"):
            return None
        if kind.startswith("list"):
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "yes", "no", "1", "0"):
                return str(value).lower() in ("true", "yes", "1")
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {name} expects {kind}, got {value!r}") from None


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options in a YAML (.yaml/.yml) or JSON file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: invalid YAML{where}: {problem}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    else:
        values = read_json_file(path)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return values


def option_fields(config_class: type = PretrainConfig) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, default, metadata) of every option of a config dataclass, for building a command-line parser."""
    out = []
    for f in fields(config_class):
        default = f.default_factory() if f.default is MISSING else f.default
        out.append((f.name, default, dict(f.metadata)))
    return out

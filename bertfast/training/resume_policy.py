"""What a resumed pretraining run may change, and what it may not.

* Fixed (refused with an error): the model shape (``preset``), the ``optimizer`` and its
  ``weight_decay`` (saved in the optimizer state), the tokenizer (``tokenizer``, ``vocab_size``,
  ``lowercase``) and the corpus: its sources and their contents (size and modification time of
  every file). Changing any of these is a new run.
* Applied and logged: ``max_steps``, ``warmup_steps`` and ``lr`` (the schedule is recomputed from
  them: the lr at the resumed step may jump), ``clip_norm``, the eval/save/log cadence,
  ``keep_checkpoints``, ``num_workers``, ``max_nonfinite_steps``, ``precision``,
  ``activation_checkpointing``, ``device``, ``cache_dir``, ``progress``, ``dist_timeout``.
* Applied with a warning: the options that shape the data stream (``seed``, ``batch_size``,
  ``grad_accum``, ``seq_len``, the masking and NSP options) and the number of processes; the run
  goes on, but not as the original one would have.
"""

from __future__ import annotations

from typing import Any

from bertfast.io import CheckpointError

FIXED_OPTIONS = ("preset", "optimizer", "weight_decay", "tokenizer", "vocab_size", "lowercase", "corpus")
APPLIED_OPTIONS = ("max_steps", "warmup_steps", "lr", "clip_norm", "eval_every", "save_every", "log_every",
                   "keep_checkpoints", "num_workers", "max_nonfinite_steps", "precision", "activation_checkpointing",
                   "device", "cache_dir", "progress", "dist_timeout")
DATA_OPTIONS = ("seed", "batch_size", "grad_accum", "seq_len", "short_seq_prob", "eval_fraction", "mask_prob",
                "mask_token_prob", "random_token_prob", "whole_word_mask")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def resume_changes(saved: dict[str, Any], current: dict[str, Any], where: str, *, saved_sources: str | None,
                   sources: str) -> tuple[list[str], list[str]]:
    """(applied changes, data-stream changes) between the checkpoint's options and this run's, as text.

    Raises :class:`CheckpointError` naming every fixed option that changed.
    """
    fixed = [k for k in FIXED_OPTIONS if k in saved and saved[k] != current[k]]
    refused = [f"{_flag(k)} {_shown(current[k])} (the run has {_shown(saved[k])})" for k in fixed]
    if "corpus" not in fixed and saved_sources is not None and saved_sources != sources:
        refused.append("the corpus files (one was added, removed, resized or modified since the checkpoint)")
    if refused:
        raise CheckpointError(f"--resume {where}: cannot change {'; '.join(refused)}. A resumed run keeps its model, "
                              "optimizer, tokenizer and corpus; start a new run with --overwrite or another "
                              "--output-dir")
    applied = [f"{_flag(k)} {_shown(saved[k])} -> {_shown(current[k])}" for k in APPLIED_OPTIONS
               if k in saved and saved[k] != current[k]]
    data = [_flag(k) for k in DATA_OPTIONS if saved.get(k) != current[k]]
    return applied, data


def merged_resume_options(saved: dict[str, Any], given: dict[str, Any], known: set[str]) -> dict[str, Any]:
    """The options of a resumed run: the checkpoint's, overridden by those given now (file or command line)."""
    base = {k: v for k, v in saved.items() if k in known and k not in ("resume", "overwrite", "output_dir")}
    return {**base, **{str(k).replace("-", "_"): v for k, v in given.items()}}

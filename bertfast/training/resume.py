"""How a run starts in its output directory, decided once for ``bertfast pretrain`` and ``bertfast finetune``.

:func:`start_run` decides, before any data is read, which of four cases a run is:

* **refused** (exit code 2): OUTPUT_DIR is locked by another run, or holds a run and neither
  ``--resume`` nor ``--overwrite`` was given (:mod:`bertfast.training.rundir`); ``--resume`` finds
  nothing to resume (fine-tuning: no finished epoch in ``last/``; an unreadable trainer state); or the
  options given change what the resumed run cannot change (the policy below).
* **overwrite**: ``--overwrite`` deletes the run's files (under the lock), then the run starts fresh.
* **fresh**: an empty directory, or ``--resume latest`` in pretraining before the first checkpoint.
* **resumed**: from the checkpoint ``--resume`` names (pretraining: ``DIR/checkpoint-STEP`` or
  ``latest``; fine-tuning: ``OUTPUT_DIR/last``). The options not given are the checkpoint's
  (:func:`resumed_options`); those given that differ follow the policy of each command.

The policies (docs/pretraining.md and docs/finetuning.md, whose tables are generated from them):

* pretraining: :data:`PRETRAIN` -- the model shape, optimizer, tokenizer and corpus are fixed; the
  schedule, cadence and runtime options are applied and logged; the options that shape the data
  stream, and the number of processes, are applied with a warning.
* fine-tuning: :data:`FINETUNE` -- everything that shapes training is fixed (the run continues
  exactly), and the number of processes too; ``--epochs`` (the schedule stretches), ``--eval`` and the
  runtime options are applied and logged.

A run saved before an option existed ran with that option's default.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from bertfast.io import CheckpointError
from bertfast.training.checkpoint import STATE_FILE, load_state, resolve_resume
from bertfast.training.distributed import (
    DistEnv,
    DistributedStall,
    broadcast_from_main,
    init_distributed,
    is_collective_failure,
    shutdown,
    stall_message,
)
from bertfast.training.rundir import FINETUNE_FILES, PRETRAIN_FILES, RunDirectory

# Never taken from a checkpoint: they say how this run starts, not what it trains.
_RUN_FLAGS = ("resume", "overwrite", "output_dir", "eval_only")


@dataclass(frozen=True)
class Policy:
    command: str
    run_files: tuple[str, ...]  # what makes OUTPUT_DIR hold a run (bertfast.training.rundir)
    fixed: tuple[str, ...]  # refused when changed
    applied: tuple[str, ...]  # applied and logged
    warned: tuple[str, ...] = ()  # applied with a warning: the data stream is not the original run's
    processes_fixed: bool = False  # a different number of processes: refused (else warned)
    hint: str = ""  # how a changed fixed option is a new run


PRETRAIN = Policy(
    "pretrain", PRETRAIN_FILES,
    fixed=("preset", "optimizer", "weight_decay", "tokenizer", "vocab_size", "lowercase", "corpus"),
    applied=("max_steps", "warmup_steps", "lr", "clip_norm", "eval_every", "save_every", "log_every",
             "keep_checkpoints", "num_workers", "max_nonfinite_steps", "precision", "activation_checkpointing",
             "device", "cache_dir", "progress", "dist_timeout"),
    warned=("seed", "batch_size", "grad_accum", "seq_len", "short_seq_prob", "eval_fraction", "mask_prob",
            "mask_token_prob", "random_token_prob", "whole_word_mask"),
    hint="A resumed run keeps its model, optimizer, tokenizer and corpus",
)
FINETUNE = Policy(
    "finetune", FINETUNE_FILES,
    fixed=("task", "model", "train", "regression", "batch_size", "grad_accum", "lr", "warmup_ratio", "weight_decay",
           "clip_norm", "seq_len", "max_answer_length", "precision", "seed", "data_format", "text_column",
           "text_pair_column", "label_column", "column_names", "label_names", "best_metric"),
    applied=("epochs", "eval", "skip_bad_rows", "device", "max_nonfinite_steps", "dist_timeout", "log_every",
             "progress"),
    processes_fixed=True,
    hint="A resumed fine-tuning run continues exactly: it keeps every option that shapes training",
)


@dataclass
class RunStart:
    """The decision: ``checkpoint`` None is a fresh run; ``run_dir`` is the lock (first process only)."""

    checkpoint: Path | None = None
    state: dict[str, Any] | None = None  # the checkpoint's trainer state
    applied: list[str] = field(default_factory=list)  # "--lr 0.001 -> 0.0005", ...
    run_dir: RunDirectory | None = None

    def release(self) -> None:
        if self.run_dir is not None:
            self.run_dir.release()
            self.run_dir = None


def _defaults(config_class: type) -> dict[str, Any]:
    return {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(config_class)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def find_checkpoint(policy: Policy, output_dir: str, resume: Any) -> Path | None:
    """The checkpoint ``resume`` names (None: none yet, a fresh start); a missing one a fine-tuning run needs
    is refused."""
    if not resume:
        return None
    if policy is PRETRAIN:
        return resolve_resume(output_dir, resume)
    last = Path(output_dir) / "last"
    if not (last / STATE_FILE).is_file():
        raise CheckpointError(f"{output_dir} has no finished epoch to resume from (no last/{STATE_FILE})")
    return last


def resumed_options(policy: Policy, config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """The options of a run from those given (``--config`` file and command line): with ``--resume``, the
    options not given are the checkpoint's, so a bare ``--resume`` continues a run."""
    given = {str(k).replace("-", "_"): v for k, v in values.items()}
    defaults = _defaults(config_class)
    checkpoint = find_checkpoint(policy, given.get("output_dir", defaults["output_dir"]), given.get("resume"))
    if checkpoint is None:
        return given
    saved = load_state(checkpoint, mmap=True)["config"]
    return {**{k: v for k, v in saved.items() if k in defaults and k not in _RUN_FLAGS}, **given}


def check_resume(policy: Policy, config: Any, state: dict[str, Any], where: str, env: DistEnv, *,
                 sources: str | None = None, positions: int | None = None) -> tuple[list[str], list[str]]:
    """(applied changes, data-stream changes) between the checkpoint's options and this run's, as text.

    Raises :class:`CheckpointError` naming every fixed option that changed. ``sources`` (pretraining)
    is the corpus fingerprint, ``positions`` the checkpoint's ``max_position_embeddings``.
    """
    saved = {**_defaults(type(config)), **state["config"]}
    current = config.to_dict()

    def changed(names: tuple[str, ...]) -> list[str]:
        return [k for k in names if saved[k] != current[k]]

    refused = [f"{_flag(k)} {_shown(current[k])} (the run has {_shown(saved[k])})" for k in changed(policy.fixed)]
    saved_sources = state.get("corpus_sources")
    if sources is not None and "corpus" not in changed(policy.fixed) and saved_sources not in (None, sources):
        refused.append("the corpus files (one was added, removed, resized or modified since the checkpoint)")
    if policy.processes_fixed and state["world_size"] != env.world_size:
        refused.append(f"the number of processes {env.world_size} (the run has {state['world_size']})")
    if refused:
        raise CheckpointError(f"--resume {where}: cannot change {'; '.join(refused)}. {policy.hint}; start a new "
                              "run with --overwrite or another --output-dir")
    if positions is not None and config.seq_len > positions:
        raise CheckpointError(f"--seq-len {config.seq_len} exceeds the checkpoint's max_position_embeddings "
                              f"({positions}) in {where}")
    applied = [f"{_flag(k)} {_shown(saved[k])} -> {_shown(current[k])}" for k in changed(policy.applied)]
    data = [_flag(k) for k in changed(policy.warned)]
    if not policy.processes_fixed and state["world_size"] != env.world_size:
        data.append("number of processes")
    return applied, data


def decide_resume(policy: Policy, config: Any, env: DistEnv, say: Callable[[str], None] = print) -> RunStart:
    """Which checkpoint this run resumes (the first process decides, the others follow) and whether its
    options may; a fresh run is ``RunStart()``. ``say`` speaks for the first process only."""
    def tell(message: str) -> None:
        if env.is_main:
            say(message)

    found = find_checkpoint(policy, config.output_dir, config.resume)  # (a refusal: on every process alike)
    path = broadcast_from_main(str(found) if found else None, env)  # the first process's "latest" for all
    if path is None:
        if config.resume:
            tell(f"no checkpoint in {config.output_dir} yet: starting from scratch")
        return RunStart()
    checkpoint = Path(path)
    state = load_state(checkpoint)
    extra: dict[str, Any] = {}
    if policy is PRETRAIN:
        from bertfast.config import BertConfig
        from bertfast.data import resolve_paths
        from bertfast.data.cache import sources_fingerprint

        extra = {"sources": sources_fingerprint(resolve_paths(config.corpus)),
                 "positions": BertConfig.from_pretrained(checkpoint).max_position_embeddings}
    applied, data = check_resume(policy, config, state, str(checkpoint), env, **extra)
    if applied:
        tell(f"resume: applying changed options: {', '.join(applied)}")
        if policy is PRETRAIN and any(option.startswith(("--max-steps", "--warmup-steps", "--lr"))
                                      for option in applied):
            tell(f"resume: the lr schedule is recomputed: warmup to {config.lr:g} over {config.warmup_steps} steps, "
                 f"linear decay to 0 at step {config.max_steps}")
    if data and env.is_main:
        warnings.warn(f"resuming with a different {', '.join(data)} than {checkpoint.name} was saved with: "
                      "the data stream will not continue the original run exactly", stacklevel=3)
    return RunStart(checkpoint, state, applied)


def start_run(policy: Policy, config: Any, env: DistEnv, say: Callable[[str], None] = print,
              subdirectories: list[Path] | None = None) -> RunStart:
    """Lock OUTPUT_DIR and refuse, overwrite or take it (first process), then :func:`decide_resume`.

    The caller calls ``release()`` on the result when the run ends; a refusal releases the lock itself.
    """
    run_dir = None
    if env.is_main:
        run_dir = RunDirectory.open(config.output_dir, policy.run_files, resume=bool(config.resume),
                                    overwrite=config.overwrite, eval_only=getattr(config, "eval_only", False),
                                    subdirectories=subdirectories or [], say=say)
    try:
        start = decide_resume(policy, config, env, say)
    except BaseException:
        if run_dir is not None:
            run_dir.release()
        raise
    start.run_dir = run_dir
    return start


@contextmanager
def training_run(policy: Policy, config: Any, say: Callable[[str], None] = print,
                 subdirectories: list[Path] | None = None) -> Iterator[tuple[DistEnv, Any, RunStart]]:
    """(this process's place, its device, the run's start) for the life of a run, under torchrun or not:
    joins the process group, :func:`start_run`, and at the end releases the lock and leaves the group.
    A collective that times out or loses a peer becomes a :class:`DistributedStall` naming the ranks."""
    env, device = init_distributed(config.device, config.dist_timeout)
    start = None
    try:
        start = start_run(policy, config, env, say, subdirectories)
        yield env, device, start
    except RuntimeError as e:
        if env.enabled and is_collective_failure(e):
            raise DistributedStall(stall_message(env, e)) from e
        raise
    finally:
        if start is not None:
            start.release()
        shutdown(env)

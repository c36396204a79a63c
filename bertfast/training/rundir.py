"""Guarding an output directory: one run at a time, no run mixed into another, no leftovers of a killed one.

* A lock file (``.bertfast.lock``, held with ``flock`` for the life of the run, so a killed run
  never leaves it locked) stops a second run in the same directory; its message names the other
  process from what the lock file says about it.
* A directory that holds another run's files is refused unless the run resumes it (``--resume``) or
  replaces it (``--overwrite``, which deletes that run's files first). An evaluation alone
  (``finetune --eval-only``) never writes into a training run's directory.
* Temporary files and directories of a killed run (a half-written checkpoint is a full checkpoint
  in size) are removed once the lock is held: nobody else can be writing them then.

``bertfast pretrain`` and ``finetune`` (through :mod:`bertfast.training.resume`) and ``bertfast glue``
guard their output directory so; ``bertfast predict`` holds the lock of the directory its output file
goes to (see :func:`bertfast.finetune.predict.predict`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from bertfast.io import describe_os_error

LOCK_FILE = ".bertfast.lock"
# write_checkpoint's ".NAME.tmp-PID" / ".NAME.old-PID" directories, the token cache's "KEY.partial-PID".
_PID_TEMPORARY = re.compile(r"^(\..+\.(?:tmp|old)|[0-9a-f]+\.partial)-(\d+)$")
# atomic_write's ".NAME.XXXXXXXX.tmp" files.
_ATOMIC_TEMPORARY = re.compile(r"^\..+\.tmp$")

PRETRAIN_FILES = ("metrics.jsonl", "metrics.png", "final", "checkpoint-*")
FINETUNE_FILES = ("metrics.jsonl", "finetune_config.json", "predictions.jsonl", "eval_results.json", "best", "last")
TRAINED_MODELS = ("best", "last", "final", "checkpoint-*")


class RunDirectoryError(ValueError):
    """The output directory cannot take this run (in use, holds another run, or not writable)."""


def _found(directory: Path, patterns: Iterable[str]) -> list[Path]:
    return sorted({p for pattern in patterns for p in directory.glob(pattern)})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: Path, subdirectories: Iterable[Path] = ()) -> list[Path]:
    """Delete what killed runs left half-written in ``directory`` (and ``subdirectories``); returns them."""
    removed = []
    for folder in (directory, *subdirectories):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _PID_TEMPORARY.match(path.name)
            stale = match is not None and not _alive(int(match.group(2)))
            # Unnamed temporaries are only this directory's own, which the lock says nobody is writing.
            stale = stale or (folder == directory and match is None and _ATOMIC_TEMPORARY.match(path.name))
            if stale:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class RunDirectory:
    """The lock on an output directory, taken by :meth:`open` after the checks; ``release`` gives it back."""

    def __init__(self, directory: Path, fd: int, flag: str = "--output-dir") -> None:
        self.directory = directory
        self.fd = fd
        self.flag = flag

    @classmethod
    def open(cls, directory: str | os.PathLike, run_files: Iterable[str], *, resume: bool, overwrite: bool,
             eval_only: bool = False, subdirectories: Iterable[Path] = (), say=print, resumable: bool = True,
             clean: bool = True, flag: str = "--output-dir") -> RunDirectory:
        """Lock ``directory`` and check it takes the run. ``resumable``: the command has ``--resume`` (the
        refusal offers it); ``clean``: remove killed runs' temporaries (not in a directory that is not a
        run's); ``flag``: the option that named the directory, for the messages."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirectoryError(f"{flag} {directory}: cannot write there: {describe_os_error(e)}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirectoryError(f"{flag} {directory} is in use by another run ({holder}); wait for it "
                                    f"to finish or choose another {flag}") from None
        except OSError as e:  # a file system without locks (some network ones): go on, unguarded
            say(f"warning: cannot lock {directory / LOCK_FILE} ({describe_os_error(e)}): nothing stops a second "
                "run in this directory")
        run = cls(directory, fd, flag)
        try:
            run._write_holder()
            run._check(list(run_files), resume=resume, overwrite=overwrite, eval_only=eval_only, resumable=resumable)
            removed = remove_stale_temporaries(directory, subdirectories) if clean else []
        except BaseException:
            run.release()
            raise
        if removed:
            say(f"removed {len(removed)} temporary file(s) left by a killed run: "
                + ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else ""))
        return run

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:300]}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(holder).encode(), 0)
        except OSError as e:
            raise RunDirectoryError(f"{self.flag} {self.directory}: cannot write there: "
                                    f"{describe_os_error(e)}") from e

    def _check(self, run_files: list[str], *, resume: bool, overwrite: bool, eval_only: bool,
               resumable: bool) -> None:
        directory = self.directory
        if eval_only:
            trained = _found(directory, TRAINED_MODELS)
            if trained:
                raise RunDirectoryError(
                    f"--eval-only would write over the training run in {directory} (it holds "
                    f"{', '.join(p.name for p in trained[:3])}); choose another --output-dir")
        found = _found(directory, run_files)
        if not found or resume:
            return
        if not overwrite:
            raise RunDirectoryError(
                f"{self.flag} {directory} holds another run ({', '.join(p.name for p in found[:4])}); pass "
                + ("--resume to continue it, " if resumable else "")
                + f"--overwrite to replace it, or choose another {self.flag}")
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            (self.directory / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass  # never locked (see open)
        os.close(self.fd)
        self.fd = -1


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say which"

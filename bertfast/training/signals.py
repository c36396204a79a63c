"""Stop signals in a run with DataLoader workers.

SLURM, ``timeout`` and systemd send SIGTERM (and Ctrl-C sends SIGINT) to the whole process group,
workers included. A worker that dies of it takes the run down before it can save, so workers ignore
both signals and only the training process reacts (it saves a checkpoint and exits). The signals are
blocked while the workers start, so none can arrive before a worker has set itself to ignore them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the training process alone handles SIGINT and SIGTERM."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` with the stop signals blocked while its workers are created (and deferred, not lost,
    in this process)."""
    if loader.num_workers == 0:
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

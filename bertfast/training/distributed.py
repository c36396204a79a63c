"""Process-group setup for multi-process training under ``torchrun`` (gloo on CPU, NCCL on GPU).

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op, so the same
training loop runs in one process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class DeviceError(ValueError):
    """The device asked for is not there."""


def pick_device(choice: str, env: DistEnv) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but CUDA is not available")
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(device_choice: str, timeout_s: float | None = None) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device.

    ``timeout_s`` bounds every collective operation: a process that waits longer for the others
    fails with an error (see :func:`stall_message`) instead of hanging for torch's 30 minutes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_choice, env)
    if env.enabled and not dist.is_initialized():
        timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **timeout)
        _progress.update(timeout_s=timeout_s, count=0, doing="joining the process group")
    return env, device


class DistributedStall(RuntimeError):
    """A collective operation timed out or lost a peer: the message names the ranks it waited for."""


# What this process last said it was doing (and how many times it said so), for the stall report.
_progress: dict[str, Any] = {"count": 0, "doing": "starting", "timeout_s": None}
_PROGRESS_KEY = "bertfast/progress/{}"


def _store() -> Any:
    return dist.distributed_c10d._get_default_store()


def report_progress(env: DistEnv, doing: str) -> None:
    """Tell the other processes (through the process group's key-value store) what this one is doing now."""
    _progress.update(count=_progress["count"] + 1, doing=doing, since=time.time())
    if not env.enabled:
        return
    record = {"count": _progress["count"], "doing": doing, "time": _progress["since"]}
    try:
        _store().set(_PROGRESS_KEY.format(env.rank), json.dumps(record))
    except RuntimeError:
        pass  # the store is gone: the collective that follows will report it


# How gloo and NCCL word a collective's timeout or a lost peer (gloo's pair timeout during a backward's
# gradient all-reduce says "Application timeout caused pair closure").
COLLECTIVE_FAILURE_MARKS = ("Timed out", "timed out", "timeout", "Connection closed", "Connection reset", "NCCL",
                            "gloo")


def is_collective_failure(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, RuntimeError) and any(mark in text for mark in COLLECTIVE_FAILURE_MARKS)


def stall_message(env: DistEnv, error: BaseException) -> str:
    """Which ranks this one waited for, and what each last reported doing."""
    waited = time.time() - _progress.get("since", time.time())
    mine = f"rank {env.rank} waited {waited:.0f} s for the other processes while {_progress['doing']}"
    others, behind = [], []
    try:
        for rank in range(env.world_size):
            key = _PROGRESS_KEY.format(rank)
            if rank == env.rank or not _store().check([key]):
                continue
            record = json.loads(_store().get(key))
            others.append(f"rank {rank}: {record['doing']} ({time.time() - record['time']:.0f} s ago)")
            if record["count"] < _progress["count"]:
                behind.append(rank)
    except RuntimeError:
        return f"{mine}; the other processes cannot be reached ({str(error).splitlines()[0]})"
    stalled = behind or [r for r in range(env.world_size) if r != env.rank]
    timeout = _progress.get("timeout_s")
    return (f"{mine}: rank(s) {', '.join(map(str, stalled))} stalled or died. Last reports: {'; '.join(others)}. "
            f"{'Raise --dist-timeout (' + format(timeout, 'g') + ' s) if they are merely slow. ' if timeout else ''}"
            f"({str(error).splitlines()[0]})")


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: Any = None) -> torch.Tensor:
    """Sum (or ``op``) ``tensor`` over ranks in place; returns it."""
    if env.enabled:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def gather_to_main(value: Any, env: DistEnv) -> list[Any] | None:
    """Every rank's ``value`` on rank 0 (None elsewhere)."""
    if not env.enabled:
        return [value]
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_from_main(value: Any, env: DistEnv) -> Any:
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

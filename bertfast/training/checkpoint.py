"""Training checkpoints: ``OUTPUT_DIR/checkpoint-STEP/`` directories that a run can resume from exactly.

A checkpoint directory holds the model in transformers' format (config.json + model.safetensors),
the tokenizer files, and ``trainer_state.pt``: optimizer, scheduler and gradient-scaler states,
every RNG state (python, numpy, torch, CUDA) of every rank, the data position and the step. The
state holds only tensors and plain containers, so it loads with ``torch.load(weights_only=True)``.

Writes are atomic: the directory is assembled under a temporary name and renamed into place, so a
crash leaves either a complete checkpoint or none; ``latest`` picks the highest complete step.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertfast.io import CheckpointError, WriteError, atomic_write, write_error

STATE_FILE = "trainer_state.pt"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def capture_rng() -> dict[str, Any]:
    """Every RNG state of this process, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) in ``output_dir``, by step."""
    found = []
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = _CHECKPOINT_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint ``resume`` names: a directory, or ``latest`` (None when there is none yet)."""
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no {STATE_FILE})")
    return path


def write_checkpoint(directory: Path, write_model: Any, state: dict[str, Any] | None) -> None:
    """Assemble a checkpoint under a temporary name, then rename it to ``directory``.

    ``write_model(tmp_dir)`` writes the model and tokenizer files; ``state`` (if any) is saved
    as the trainer state.
    """
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_error(directory, e) from e
    try:
        write_model(tmp)
        if state is not None:
            atomic_write(tmp / STATE_FILE, lambda path: torch.save(state, path))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(directory, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(directory: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint directory; a truncated or foreign file is a CheckpointError.

    ``mmap`` maps the tensors instead of reading them (for a look at the saved options alone).
    """
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read the trainer state {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a trainer state")
    return state


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` most recent checkpoints (keep=0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)

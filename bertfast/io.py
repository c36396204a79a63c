"""Reading and writing checkpoint files: atomic writes, safetensors, and safe loading of the rest."""

from __future__ import annotations

import json
import os
import pickle
import resource
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load on first use: the command line's --help needs neither
    from torch import Tensor

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


class WriteError(OSError):
    """A file of the run could not be written (read-only file system, disk full, size limit, ...)."""


def describe_os_error(error: OSError) -> str:
    """The cause of a failed file operation in words: read-only file system, no space left on device, ..."""
    return (error.strerror or str(error)).lower()


def read_json_file(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON value in ``path``; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None


def _write_failure_cause(path: Path, error: BaseException) -> str:
    """Why writing ``path`` failed; torch's writer hides the system's reason, so ask the file system."""
    if isinstance(error, OSError) and error.errno is not None:
        return describe_os_error(error)
    try:
        fs = os.statvfs(path.parent)
        if fs.f_flag & os.ST_RDONLY:
            return "read-only file system"
        if fs.f_bavail * fs.f_frsize < 1 << 20:
            return "no space left on device"
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"the file size limit of this process was reached (ulimit -f: {limit:,} bytes)"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def write_error(path: str | os.PathLike, error: BaseException) -> WriteError:
    """A :class:`WriteError` naming ``path`` and the cause of ``error``."""
    return WriteError(f"cannot write {path}: {_write_failure_cause(Path(path), error)}")


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises; safetensors' own error only once a write has loaded safetensors."""
    safetensors = sys.modules.get("safetensors")
    return (OSError, RuntimeError, *((safetensors.SafetensorError,) if safetensors is not None else ()))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from e
    os.close(fd)
    try:
        write(tmp)
        # mkstemp made the file private (0600); give it the mode an ordinary new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except _write_errors() as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Write ``tensors`` atomically as safetensors (tensors are made contiguous and unshared)."""
    from safetensors.torch import save_file

    owned = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(owned, tmp, metadata={"format": "pt"}))


def _load_one(file: Path) -> dict[str, Tensor]:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        # weights_only refuses to build arbitrary objects, so a malicious pickle cannot run code.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"cannot read weights from {file}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors")
    return state


def _load_sharded(index_file: Path) -> dict[str, Tensor]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file} is not a valid shard index: {e}") from e
    state: dict[str, Tensor] = {}
    for shard in shards:
        shard_file = index_file.parent / shard
        if not shard_file.is_file():
            raise CheckpointError(f"shard {shard} listed in {index_file.name} is missing")
        state.update(_load_one(shard_file))
    return state


def load_state_dict(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Load the weights of a transformers-format checkpoint directory (safetensors preferred)."""
    directory = Path(directory)
    for name, loader in ((SAFE_WEIGHTS_NAME, _load_one), (SAFE_WEIGHTS_INDEX_NAME, _load_sharded),
                         (PT_WEIGHTS_NAME, _load_one), (PT_WEIGHTS_INDEX_NAME, _load_sharded)):
        if (directory / name).is_file():
            return loader(directory / name)
    raise CheckpointError(
        f"no weights found in {directory}: expected {SAFE_WEIGHTS_NAME}, {PT_WEIGHTS_NAME} or a shard index"
    )

"""Pretraining: the training loop, optimizers, checkpoints, metrics and multi-process setup."""

from __future__ import annotations

import importlib
from typing import Any

# Public names and their modules, imported on first use: the command line reads the options
# (bertfast.training.config) without loading torch or the models.
_EXPORTS = {
    "PretrainConfig": "bertfast.training.config",
    "load_config_file": "bertfast.training.config",
    "Lamb": "bertfast.training.optim",
    "build_optimizer": "bertfast.training.optim",
    "linear_schedule": "bertfast.training.optim",
    "parameter_groups": "bertfast.training.optim",
    "Pretrainer": "bertfast.training.trainer",
    "pretrain": "bertfast.training.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bertfast.training' has no attribute {name!r}")

"""Pretraining: the training loop, optimizers, checkpoints, metrics and multi-process setup."""

from __future__ import annotations

from bertfast._lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _EXPORTS)

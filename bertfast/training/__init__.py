"""Pretraining: the training loop, optimizers, checkpoints, metrics and multi-process setup."""

from bertfast.training.config import PretrainConfig, load_config_file
from bertfast.training.optim import Lamb, build_optimizer, linear_schedule, parameter_groups
from bertfast.training.trainer import Pretrainer, pretrain

__all__ = [
    "Lamb",
    "PretrainConfig",
    "Pretrainer",
    "build_optimizer",
    "linear_schedule",
    "load_config_file",
    "parameter_groups",
    "pretrain",
]

"""Fine-tuning a pretrained BERT: data readers, the four tasks, the training loop behind ``bertfast finetune``."""

from bertfast.finetune.config import FinetuneConfig
from bertfast.finetune.data import DataError
from bertfast.finetune.tasks import TASKS, make_task
from bertfast.finetune.trainer import Finetuner, finetune

__all__ = ["TASKS", "DataError", "FinetuneConfig", "Finetuner", "finetune", "make_task"]
